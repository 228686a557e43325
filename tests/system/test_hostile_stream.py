"""Security review of streamed execs (f7d8e45): each test here is a finding, written to
fail on the code it was found in. Real runc containers, real supervisor processes of
their own (these attacks would disturb the session's supervisor).

* a restricted CURVE key takes over another key's privileged exec (reattach, stdin);
* finished records keep each exec's argv: 1000 records of a 4 MiB argv, an hour long;
* streamed output bypasses the per-connection reply budget: ~64 MiB per connection;
* a stdin request before the exec's pipes exist is an INTERNAL error;
* a detached exec's output flood is read and dropped on the supervisor's CPU.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq

from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import CurveSupervisor, Supervisor, wait_ready

pytestmark = pytest.mark.root

MiB = 1 << 20


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def own_supervisor(box, tmp_path):
    sup = Supervisor(box, str(tmp_path / "sup"))
    yield sup
    sup.stop()


@pytest.fixture(scope="module")
def target(box):
    cid = box.run("stream-target")
    yield cid
    box.delete(cid)


# ---------------------------------------------------------------- access lists

@pytest.fixture
def curve(box, target, tmp_path):
    """CurveZMQ on TCP: `admin` may do everything; `monitor` may exec into every
    container, but only as the default user and never privileged."""
    sup = CurveSupervisor(box, str(tmp_path / "keys"),
                          'containers = ["*"]\nusers = [""]\nprivileged = false\nadmin = false')
    try:
        with sup.client("admin") as c:
            wait_ready(c, target)
        yield sup.client
    finally:
        sup.stop()


def test_a_key_that_may_not_exec_privileged_cannot_drive_another_keys_privileged_shell(curve, target):
    """FINDING (high): stream requests check only the exec's container against the
    key's access list, never its user or privileged flag. `monitor` may not exec
    privileged nor as root by name, yet it re-attaches to the admin's privileged
    interactive shell (exec ids count up from 1: guessable), types into it and reads
    its output."""
    with curve("admin") as admin, curve("monitor") as monitor:
        with pytest.raises(WarmexecError) as e:  # what the ACL says monitor may not do
            monitor.exec(target, ["true"], privileged=True)
        assert e.value.code == errors.FORBIDDEN
        shell = admin.stream(target, ["sh"], privileged=True, user="root", interactive=True, detach=True)
        assert [e[0] for e in shell.events()] == ["started"]
        stolen = monitor.reattach(shell.exec_id)
        try:
            first = stolen.next_event(10)
        except WarmexecError as exc:
            admin.kill(shell.exec_id)
            assert exc.code == errors.FORBIDDEN
            return
        assert first[0] == "attached"
        stolen.write(b"grep CapEff /proc/self/status; exit 0\n", eof=True)
        out = b"".join(ev[2] for ev in stolen.events() if ev[0] == "output")
        pytest.fail(f"monitor drove a privileged shell it may not start: {out!r}")


def test_a_restricted_key_cannot_signal_or_inspect_an_exec_it_could_not_start(curve, target):
    """FINDING (same cause): `monitor` kills the admin's privileged exec and reads its
    argv (which may carry secrets) through inspect."""
    with curve("admin") as admin, curve("monitor") as monitor:
        s = admin.stream(target, ["sleep", "1000", "--secret-in-argv"], privileged=True, detach=True)
        list(s.events())
        outcomes = []
        for op, fields in (("inspect", {}), ("signal", {"signal": "KILL"})):
            try:
                monitor.call(op, exec_id=s.exec_id, **fields)
                outcomes.append(f"{op}: allowed")
            except WarmexecError as exc:
                outcomes.append(f"{op}: {exc.code}")
        try:
            admin.kill(s.exec_id)
        except WarmexecError:
            pass
        assert outcomes == ["inspect: FORBIDDEN", "signal: FORBIDDEN"]


# ---------------------------------------------------------------- client memory

def test_finished_records_do_not_keep_megabytes_of_argv_each(own_supervisor, target):
    """FINDING (high): a finished streamed exec's record keeps its whole argv (up to the
    4 MiB frame) for an hour, 1000 of them: about 4 GiB of the supervisor's memory that
    any client may pin with execs that fail at once. Measured: 40 such execs, +170 MiB."""
    with Client(own_supervisor.endpoint) as c:
        wait_ready(c, target)
        s = c.stream(target, ["true"])
        list(s.events())
        before = _rss_kib(own_supervisor.proc.pid)
        argv = ["/nonexistent"] + ["x" * ((128 << 10) - 1)] * 30  # 3.75 MiB; never runs
        for _ in range(40):
            s = c.stream(target, argv)
            list(s.events())
            assert s.result["exit_code"] == 127
        grown = _rss_kib(own_supervisor.proc.pid) - before
        assert grown < 32 << 10, f"supervisor RSS grew {grown} KiB for 40 finished records"


def test_stream_output_a_client_does_not_read_is_bounded_per_connection(own_supervisor, target):
    """FINDING (high): streamed output is sent copied with only SNDHWM (1000 messages)
    as its bound, not through the reply budget (8 MiB per connection): a client that
    grants credit and does not read pins 1000 x 64 KiB per connection, with no bound on
    connections. Measured: 3 connections, +192 MiB."""
    ctx = zmq.Context()
    socks = []
    try:
        with Client(own_supervisor.endpoint) as c:
            wait_ready(c, target)
            s = c.stream(target, ["true"])
            list(s.events())
            before = _rss_kib(own_supervisor.proc.pid)
            for k in range(3):
                d = ctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.setsockopt(zmq.RCVHWM, 1)
                d.setsockopt(zmq.RCVBUF, 4096)
                d.connect(own_supervisor.endpoint)
                d.send(msgpack.packb({"v": 1, "id": k, "op": "exec", "container": target,
                                      "argv": ["cat", "/dev/zero"], "stream": True,
                                      "window": 4 * MiB, "grace": 3600.0}))
                assert d.poll(10_000)
                started = msgpack.unpackb(d.recv())
                assert started["event"] == "started"
                socks.append((d, started["exec_id"]))
            end = time.monotonic() + 8
            while time.monotonic() < end:
                for d, exec_id in socks:
                    d.send(msgpack.packb({"v": 1, "id": None, "op": "credit", "exec_id": exec_id,
                                          "bytes": 4 * MiB}))
                time.sleep(0.02)
            grown = _rss_kib(own_supervisor.proc.pid) - before
            for _, exec_id in socks:
                c.kill(exec_id)
            assert grown < 3 * (16 << 10), f"supervisor RSS grew {grown} KiB for 3 unread connections"
    finally:
        for d, _ in socks:
            d.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- internal errors

def test_stdin_before_the_exec_has_pipes_is_no_internal_error(own_supervisor, target):
    """FINDING (medium): an interactive streamed exec waiting for its profile's worker
    (a new user: the worker is starting) has no stdin pipe yet (stdin_fd -1); a stdin
    request for it (exec ids are sequential: the next one is known) writes to fd -1,
    then closes -1: EBADF escapes as INTERNAL, and the stream's stdin state is left
    half-changed (the data is queued, counted and never answered)."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        with Client(own_supervisor.endpoint) as c:
            wait_ready(c, target)
            s = c.stream(target, ["true"])
            list(s.events())
            d.connect(own_supervisor.endpoint)
            d.send(msgpack.packb({"v": 1, "id": "exec", "op": "exec", "container": target, "argv": ["cat"],
                                  "user": "alice", "stream": True, "interactive": True, "grace": 5.0}))
            d.send(msgpack.packb({"v": 1, "id": "stdin", "op": "stdin", "exec_id": s.exec_id + 1,
                                  "data": b"hello\n", "eof": True}))
            replies = {}
            end = time.monotonic() + 10
            while "stdin" not in replies and time.monotonic() < end:
                if d.poll(200):
                    m = msgpack.unpackb(d.recv())
                    replies.setdefault(m["id"], m)
            try:
                c.kill(s.exec_id + 1)
            except WarmexecError:
                pass
        assert "stdin" in replies
        assert replies["stdin"].get("error", {}).get("code") != errors.INTERNAL, replies["stdin"]
        assert "internal error" not in own_supervisor.read_log()
    finally:
        d.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- the supervisor's CPU

def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_detached_exec_flooding_its_output_costs_the_container_not_the_supervisor(own_supervisor, box,
                                                                                    target):
    """FINDING (medium): a detached exec's output is read and dropped by the supervisor
    itself, as fast as the container writes it: the container spends the supervisor's
    CPU (on the one-shot path the worker, charged to the container, drops it). Measured:
    3 detached `cat /dev/zero`: 1.0 s of supervisor CPU in 3 s (3.2 s in 5 s in another
    run, with fewer execs beside it); another container's
    `true` went from ~2 ms to 4 ms median, 45 ms at worst (never past 1 s here)."""
    victim = box.run("stream-victim")
    ids = []
    try:
        with Client(own_supervisor.endpoint) as c:
            wait_ready(c, target)
            wait_ready(c, victim)
            for _ in range(3):
                s = c.stream(target, ["cat", "/dev/zero"], detach=True, timeout=60)
                list(s.events())
                ids.append(s.exec_id)
            before, start, worst = _cpu_seconds(own_supervisor.proc.pid), time.monotonic(), 0.0
            while time.monotonic() - start < 3:
                t = time.monotonic()
                assert c.exec(victim, ["true"], timeout=5)["exit_code"] == 0
                worst = max(worst, time.monotonic() - t)
                time.sleep(0.05)
            spent = _cpu_seconds(own_supervisor.proc.pid) - before
            for exec_id in ids:
                c.kill(exec_id)
            assert worst < 1.0
            assert spent < 0.5, f"the supervisor spent {spent:.2f} s of CPU in 3 s on a container's flood"
    finally:
        box.delete(victim)
