"""Load and isolation: output floods, in-flight limits, hooks that hang, and what of the
supervisor (its environment, its descriptors, its memory) an exec can reach."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
import urllib.request

import psutil
import pytest
import zmq

from warmexec.protocol import Client, codec, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import Supervisor, wait_for, wait_ready

pytestmark = pytest.mark.root

MIB = 1 << 20
SECRET = "hunter2"


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _metrics(sup: Supervisor) -> str:
    url = f"http://127.0.0.1:{sup.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, 0 if absent (labels in any order)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


# ---------------------------------------------------------------------- output flood

def test_output_flood_is_truncated_and_costs_the_supervisor_no_memory(supervisor, client, container):
    sup = psutil.Process(supervisor.proc.pid)
    client.exec(container, ["head", "-c", "1000000", "/dev/zero"], capture=4096)  # warm the path
    rss0 = sup.memory_info().rss
    t0 = time.monotonic()
    r = client.exec(container, ["head", "-c", "300000000", "/dev/zero"], capture=4096, timeout=60)
    elapsed = time.monotonic() - t0
    rss1 = sup.memory_info().rss
    print(f"\n300 MB of output, capture 4096: {elapsed:.2f}s, supervisor RSS "
          f"{rss0 / MIB:.1f} -> {rss1 / MIB:.1f} MiB")
    assert r["exit_code"] == 0 and not r["timed_out"]
    assert r["truncated"] and r["stdout"] == b"\0" * 4096 and r["stderr"] == b""
    assert rss1 - rss0 < 10 * MIB


# ---------------------------------------------------------------------------- BUSY

def test_busy_at_the_per_container_and_the_total_limit(box, tmp_path):
    sup = Supervisor(box, str(tmp_path), "[limits]\nmax_inflight = 6\nmax_inflight_per_container = 4\n")
    x, y = box.run("busy-x"), box.run("busy-y")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, x)
            wait_ready(c, y)

            def refused(cid: str) -> float:
                t0 = time.monotonic()
                with pytest.raises(WarmexecError) as e:
                    c.call("exec", timeout=5, container=cid, argv=["true"])
                assert e.value.code == errors.BUSY
                return time.monotonic() - t0

            on_x = [c.submit("exec", container=x, argv=["sleep", "2"]) for _ in range(4)]
            assert refused(x) < 0.5                     # X is at its own limit
            on_y = [c.submit("exec", container=y, argv=["sleep", "2"]) for _ in range(2)]
            assert refused(y) < 0.5                     # Y has room, the supervisor has none
            assert {r["id"]: r["inflight"] for r in c.list() if r["id"] in (x, y)} == {x: 4, y: 2}
            for rid in on_x + on_y:
                r = c.result(rid, timeout=15)
                assert r["exit_code"] == 0 and not r["timed_out"]
            assert c.exec(x, ["true"])["exit_code"] == 0
            assert c.exec(y, ["true"])["exit_code"] == 0
        assert _metric(_metrics(sup), "warmexec_exec_errors_total", code="BUSY") == 2
    finally:
        assert sup.stop() == 0
        box.delete(x)
        box.delete(y)


# ------------------------------------------------------- a client that does not read

def test_unread_replies_do_not_grow_the_supervisor_without_bound(box, container, tmp_path):
    # A fresh supervisor: the session's has freed memory of earlier tests to reuse, which
    # would hide the growth from RSS.
    sup = Supervisor(box, str(tmp_path))
    proc = psutil.Process(sup.proc.pid)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            assert c.exec(container, ["head", "-c", str(MIB), "/dev/zero"], capture=MIB)["exit_code"] == 0
            rss0 = proc.memory_info().rss
            s.connect(sup.endpoint)
            for i in range(64):  # 64 replies of 1 MiB (the largest capture): 64 MiB unbounded
                s.send(codec.pack({"v": 1, "id": i, "op": "exec", "container": container,
                                   "argv": ["head", "-c", str(MIB), "/dev/zero"], "capture": MIB}))

            def answered() -> bool:  # the warm-up exec and the 64
                return _metric(_metrics(sup), "warmexec_exec_exits_total", container=container,
                               code="0") == 65
            wait_for(answered, 60, "the 64 execs to be answered (into a client that does not read)")
            grown = proc.memory_info().rss - rss0
            dropped = _metric(_metrics(sup), "warmexec_exec_errors_total", code="REPLY_DROPPED")
    finally:
        s.close()
        assert sup.stop() == 0
    print(f"\n64 unread replies of 1 MiB: supervisor RSS +{grown / MIB:.0f} MiB, {dropped} dropped")
    assert grown < 40 * MIB, f"64 unread 1 MiB replies held {grown / MIB:.0f} MiB in the supervisor"
    assert dropped and dropped >= 32  # a byte budget held: the rest were counted, not kept


# -------------------------------------------------------------------- hanging hooks

def test_a_hanging_hook_never_delays_an_exec_and_is_killed_and_counted(box, tmp_path):
    sup = Supervisor(box, str(tmp_path), '[[hooks.start]]\ncommand = ["sleep", "100"]\ntimeout = 0.5\n')
    cid = box.run("hook-hang")
    proc = psutil.Process(sup.proc.pid)

    def hung_hooks() -> list[psutil.Process]:
        out = []
        for p in proc.children():
            with contextlib.suppress(psutil.Error):
                if p.cmdline() == ["sleep", "100"]:
                    out.append(p)
        return out

    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, cid)
            for _ in range(5):
                t0 = time.monotonic()
                assert c.exec(cid, ["true"], timeout=5)["exit_code"] == 0
                assert time.monotonic() - t0 < 0.5, "an exec waited for its start hook"
            assert hung_hooks(), "the start hooks were not started"
            wait_for(lambda: not hung_hooks(), 5, "the hung hooks to be killed at their timeout")
            assert not [p for p in proc.children() if p.status() == psutil.STATUS_ZOMBIE]
            wait_for(lambda: _metric(_metrics(sup), "warmexec_hook_failures_total",
                                     kind="start", reason="timeout") == 5, 5, "5 hook timeouts counted")
            text = _metrics(sup)
            assert _metric(text, "warmexec_hook_runs_total", kind="start") == 5
            assert c.exec(cid, ["true"])["exit_code"] == 0
    finally:
        assert sup.stop() == 0
        box.delete(cid)


# --------------------------------------------------------- what an exec can reach

@pytest.fixture(scope="module")
def secret_supervisor(box, tmp_path_factory):
    """A supervisor with a secret in its environment, a default container and one that
    also has CAP_SYS_PTRACE (as `docker run --cap-add SYS_PTRACE` gives)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARMEXEC_TEST_SECRET", SECRET)
        sup = Supervisor(box, str(tmp_path_factory.mktemp("secret")))
    cfg = box.config()
    for kind in ("bounding", "effective", "permitted"):
        cfg["process"]["capabilities"][kind].append("CAP_SYS_PTRACE")
    plain, ptrace = box.run("secret-plain"), box.run("secret-ptrace", cfg)
    try:
        with Client(sup.endpoint) as c:
            for cid in (plain, ptrace):
                wait_ready(c, cid)
                for user in (None, "alice"):  # the profiles' processes exist from here on
                    assert c.exec(cid, ["true"], user=user)["exit_code"] == 0
        yield sup, plain, ptrace
    finally:
        assert sup.stop() == 0
        box.delete(plain)
        box.delete(ptrace)


def test_no_supervisor_secret_or_descriptor_reaches_an_exec(secret_supervisor):
    sup, cid, _ = secret_supervisor
    assert SECRET in open(f"/proc/{sup.proc.pid}/environ").read()  # the supervisor has it
    with Client(sup.endpoint) as c:
        for user, privileged in ((None, False), ("alice", False), (None, True)):
            env = c.exec(cid, ["env"], user=user, privileged=privileged)["stdout"]
            assert SECRET.encode() not in env and b"WARMEXEC" not in env
            r = c.exec(cid, ["ls", "-l", "/proc/self/fd"], user=user, privileged=privileged)
            # 0-2, and 3: the directory ls is listing (closed by the time it reads the link)
            fds = sorted(int(line.split()[8]) for line in r["stdout"].decode().splitlines()[1:])
            assert fds == [0, 1, 2, 3], r["stdout"].decode()


def test_container_processes_cannot_read_warmexec_processes_environ(secret_supervisor):
    """warmexec's processes that take a container user's credentials (a worker per
    profile) are non-dumpable: not even a process of the same
    uid may read their /proc files; and nothing a container process can read holds the
    supervisor's environment."""
    sup, cid, _ = secret_supervisor
    alice_side = []
    for p in _descendants(sup.proc.pid):  # a joiner or a command may exit meanwhile
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.uids().real == 1000 and p.status() != psutil.STATUS_ZOMBIE:
                alice_side.append(p)
    assert alice_side, "no warmexec process runs with alice's credentials"
    for p in alice_side:
        # A dumpable process's /proc/PID files belong to its uid; a non-dumpable one's to root.
        assert os.stat(f"/proc/{p.pid}/environ").st_uid == 0, f"{p.pid} {p.cmdline()} is dumpable"
    with Client(sup.endpoint) as c:
        for user in ("alice", None):
            r = c.exec(cid, ["sh", "-c", "cat /proc/[0-9]*/environ; true"], user=user)
            assert SECRET.encode() not in r["stdout"], f"{user or 'root'} read the supervisor's secret"


def test_a_container_with_cap_sys_ptrace_cannot_read_the_supervisors_environment(box, secret_supervisor):
    """Non-dumpable does not stop CAP_SYS_PTRACE. Up to 1f779be the spawners lived in
    the container's pid namespace and carried the supervisor's environment (the zygote
    inherits it): `cat /proc/*/environ` here printed the secret. The workers that live
    there now (since 5a3d0bf) carry only the zygote's filtered environment."""
    _, _, cid = secret_supervisor
    # any process of the container will do; this one is a plain `runc exec`
    r = box.exec(cid, ["sh", "-c", "cat /proc/[0-9]*/environ; true"])
    assert SECRET.encode() not in r.stdout


def test_a_container_with_cap_sys_ptrace_cannot_reach_the_host_filesystem(box, secret_supervisor, tmp_path):
    """Up to 1f779be a spawner in the container's pid namespace kept an fd of the host's
    procfs (its own fdinfo directory): with CAP_SYS_PTRACE a container process opened
    /proc/<spawner>/fd/N/../.. , the host's /proc, and read the host's files through
    /proc/<host pid>/root. A container escape; the workers in the container's pid
    namespace (since 5a3d0bf) hold no host fd, and this walk must keep finding nothing."""
    sup, _, cid = secret_supervisor
    token = secrets.token_hex(16)
    marker = tmp_path / "host-only-marker"
    marker.write_text(token)
    script = (f'for f in /proc/[0-9]*/fd/*; do cat "$f/../../{sup.proc.pid}/root{marker}" 2>/dev/null; '
              f'done; true')
    r = box.exec(cid, ["sh", "-c", script])
    assert token.encode() not in r.stdout, "a container process read a file of the host"


def test_supervisor_stays_out_of_a_container_without_cap_sys_ptrace(secret_supervisor, tmp_path):
    """The same walk as above, from a default container (no CAP_SYS_PTRACE): nothing."""
    sup, cid, _ = secret_supervisor
    token = secrets.token_hex(16)
    marker = tmp_path / "host-only-marker"
    marker.write_text(token)
    script = (f'for f in /proc/[0-9]*/fd/*; do cat "$f/../../{sup.proc.pid}/root{marker}" 2>/dev/null; '
              f'done; true')
    with Client(sup.endpoint) as c:
        for user in (None, "alice"):
            r = c.exec(cid, ["sh", "-c", script], user=user)
            assert token.encode() not in r["stdout"]
