"""Streamed execs on a real container: output as it is written, order, flow control,
stdin streamed, silent clients, detach, inspect, kill and re-attach."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import REPO, wait_for

pytestmark = pytest.mark.root

MiB = 1 << 20


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _blocked_on_pipe(pid: int) -> bool:
    """Sleeping in the kernel on a full pipe (a write, or busybox cat's sendfile)."""
    try:
        with open(f"/proc/{pid}/stack") as f:
            stack = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state == "S" and "pipe" in stack


def test_output_arrives_while_the_command_runs(client, container):
    s = client.stream(container, ["sh", "-c", "echo first; read x; echo never"], interactive=True)
    kinds = [s.next_event(10), s.next_event(10)]
    assert kinds[0][0] == "started" and kinds[1] == ("output", 1, b"first\n")
    assert client.inspect(s.exec_id)["running"] is True  # still waiting for its stdin
    s.signal("KILL")
    events = list(s.events())
    assert events[-1][0] == "exit" and s.result["exit_code"] == 137
    assert client.inspect(s.exec_id)["running"] is False


def test_order_is_kept_across_stdout_and_stderr(client, container):
    s = client.stream(container, ["sh", "-c", "echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c; exit 3"])
    outputs = [e for e in s.events() if e[0] == "output"]
    assert outputs == [("output", 1, b"a\n"), ("output", 2, b"b\n"), ("output", 1, b"c\n")]
    assert s.result["exit_code"] == 3 and s.result["event"] == "exit"
    assert s.result["stdout"] == b"" and s.result["pid"] == s.pid


def test_sequence_numbers_count_every_chunk(client, container):
    rid = client.submit("exec", container=container, argv=["sh", "-c", "seq 1 2000; seq 1 500 >&2"],
                        stream=True, _stream=True)
    msgs = []
    while not msgs or msgs[-1].get("event") != "exit":
        client._wait_any(5)
        while client._streams[rid]:
            msgs.append(client._streams[rid].popleft())
    out = [m for m in msgs if m.get("event") == "output"]
    assert [m["seq"] for m in out] == list(range(len(out)))
    for stream, n in ((1, 2000), (2, 500)):
        text = b"".join(m["data"] for m in out if m["stream"] == stream)
        assert text == "".join(f"{i}\n" for i in range(1, n + 1)).encode()


def test_a_client_that_stops_reading_stops_the_command_not_the_supervisor(supervisor, client, container):
    """cat /dev/zero floods; the client takes nothing for a while: the supervisor reads
    no more than the window, its memory stays put, and the command blocks on its pipe."""
    sup_pid = supervisor.proc.pid
    s = client.stream(container, ["cat", "/dev/zero"], window=256 << 10)
    assert s.next_event(10)[0] == "started"
    rss = _status(sup_pid, "VmRSS")
    wait_for(lambda: _blocked_on_pipe(s.pid), 10, "cat to block on its full pipe")
    for _ in range(20):  # the heartbeat goes on (no credit): the exec lives
        s.client._wait_any(0.1)
        s._tick()
    assert _blocked_on_pipe(s.pid)
    assert _status(sup_pid, "VmRSS") - rss < 16 << 10  # KiB: not the GiBs cat wanted to write
    queued = sum(len(m.get("data", b"")) for m in s.inbox)
    assert queued <= 256 << 10
    got = 0
    while got < 4 * MiB:  # reading again lets it run again
        event = s.next_event(10)
        assert event is not None and event[0] == "output"
        got += len(event[2])
    s.signal("KILL")
    list(s.events())
    assert s.result["exit_code"] == 137


def test_100_mib_through_cat_with_bounded_supervisor_memory(supervisor, client, container):
    sup_pid = supervisor.proc.pid
    before = _status(sup_pid, "VmHWM")
    block = os.urandom(MiB)
    want = hashlib.sha256()
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            for i in range(100):
                chunk = block[i:] + block[:i]
                want.update(chunk)
                f.write(chunk)

    feeder = threading.Thread(target=feed)
    feeder.start()

    class Sink:
        def __init__(self) -> None:
            self.hash, self.size = hashlib.sha256(), 0

        def write(self, data: bytes) -> None:
            self.hash.update(data)
            self.size += len(data)

        def flush(self) -> None:
            pass

    out = Sink()
    s = client.stream(container, ["cat"], interactive=True)
    result = s.run(r, out, None)
    feeder.join()
    os.close(r)
    assert result["exit_code"] == 0
    assert out.size == 100 * MiB and out.hash.digest() == want.digest()
    assert _status(sup_pid, "VmHWM") - before < 32 << 10  # KiB: a few windows, never the 100 MiB


def test_stdin_eof_ends_the_commands_input(client, container):
    s = client.stream(container, ["wc", "-c"], interactive=True)
    assert s.next_event(10)[0] == "started"
    s.write(b"x" * 300_000, eof=True)
    output = b"".join(e[2] for e in s.events() if e[0] == "output")
    assert output.strip() == b"300000" and s.result["exit_code"] == 0


def test_a_client_killed_mid_stream_gets_its_command_killed(supervisor, client, container):
    script = (f"import sys, os; sys.path.insert(0, {REPO!r})\n"
              "from warmexec.protocol import Client\n"
              f"c = Client({supervisor.endpoint!r})\n"
              f"s = c.stream({container!r}, ['sleep', '1000'], grace=1)\n"
              "e = s.next_event(10)\n"
              "print(s.exec_id, flush=True)\n"
              "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    exec_id = int(out.stdout)
    record = wait_for(lambda: (lambda r: r if not r["running"] else None)(client.inspect(exec_id)), 10,
                      "the silent client's exec to be killed")
    assert record["error"]["code"] == errors.CLIENT_GONE
    assert record["pid"] is not None
    wait_for(lambda: not os.path.exists(f"/proc/{record['pid']}/status"), 10, "the sleep to be gone")


def test_detach_inspect_kill(client, container):
    s = client.stream(container, ["sh", "-c", "echo out; sleep 1000"], detach=True, grace=1)
    events = list(s.events())
    assert events[0][0] == "started" and len(events) == 1 and s.pid
    exec_id = s.exec_id
    info = client.inspect(exec_id)
    assert info["running"] is True and info["detached"] is True
    assert info["argv"] == ["sh", "-c", "echo out; sleep 1000"] and info["pid"] == s.pid
    client.kill(exec_id, "TERM", group=True)  # sh and its sleep
    info = wait_for(lambda: (lambda r: r if not r["running"] else None)(client.inspect(exec_id)), 10)
    assert info["exit_code"] == 143 and info["ended_at"] >= info["started_at"]
    with pytest.raises(WarmexecError) as e:
        client.inspect(10 ** 9)
    assert e.value.code == errors.NO_SUCH_EXEC


def test_reattach_to_a_detached_exec(client, container, supervisor):
    s = client.stream(container, ["sh", "-c", "while :; do echo tick; sleep 0.05; done"], detach=True)
    list(s.events())
    with Client(supervisor.endpoint) as other:  # another connection takes it up
        again = other.reattach(s.exec_id)
        assert again.next_event(10)[0] == "attached"
        event = again.next_event(10)
        assert event[0] == "output" and b"tick" in event[2]
        again.signal("KILL", group=True)
        list(again.events())
        assert again.result["exit_code"] == 137 and again.result["exec_id"] == s.exec_id


def test_stream_requests_are_checked(client, container):
    for fields in ({"exec_id": "1"}, {"exec_id": 1, "bytes": -1}, {"exec_id": 1, "bytes": 1 << 40}):
        with pytest.raises(WarmexecError) as e:
            client.call("credit", **fields)
        assert e.value.code == errors.BAD_REQUEST
    with pytest.raises(WarmexecError) as e:
        client.call("stdin", exec_id=10 ** 9, data=b"x")
    assert e.value.code == errors.NO_SUCH_EXEC
    with pytest.raises(WarmexecError) as e:
        client.call("exec", container=container, argv=["cat"], stream=True, stdin=b"x")
    assert e.value.code == errors.BAD_REQUEST
    s = client.stream(container, ["sleep", "100"])  # not interactive: no stdin requests
    assert s.next_event(10)[0] == "started"
    with pytest.raises(WarmexecError) as e:
        client.call("stdin", exec_id=s.exec_id, data=b"x")
    assert e.value.code == errors.BAD_REQUEST
    s.signal("KILL")
    list(s.events())
    assert s.result["exit_code"] == 137
