"""Exec semantics on a real container: exit statuses, I/O, timeouts, hooks, metrics."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
import zmq

from warmexec.protocol import Client, codec, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import SupervisorProcess, wait_for, wait_ready

pytestmark = pytest.mark.root


def test_exit_codes_follow_the_shell_convention(client, container):
    assert client.exec(container, ["true"])["exit_code"] == 0
    r = client.exec(container, ["sh", "-c", "exit 3"])
    assert (r["exit_code"], r["signal"]) == (3, None)
    r = client.exec(container, ["sh", "-c", "kill -TERM $$"])
    assert (r["exit_code"], r["signal"], r["core_dumped"]) == (143, signal.SIGTERM, False)


def test_missing_executable_is_127_and_not_executable_126(box, client, container):
    r = client.exec(container, ["no-such-command"])
    assert r["exit_code"] == 127 and r["exec_error"]["code"] == errors.NOT_FOUND
    assert b"executable file not found" in r["stderr"]
    assert client.exec(container, ["/bin/nope"])["exit_code"] == 127
    r = client.exec(container, ["/bin/notexec"])
    assert r["exit_code"] == 126 and r["exec_error"]["code"] == errors.PERMISSION
    assert client.exec(container, ["/tmp"])["exit_code"] == 126
    # runc exec agrees that none of these run (it reports 255, its own failure code)
    assert box.exec(container, ["/bin/notexec"]).returncode != 0


def test_bad_cwd_is_a_clear_error(client, container):
    with pytest.raises(WarmexecError) as e:
        client.exec(container, ["true"], cwd="/does/not/exist")
    assert e.value.code == errors.BAD_CWD


def test_pids_and_rusage(client, container):
    r = client.exec(container, ["sh", "-c", "echo $$"])
    assert int(r["stdout"]) == r["container_pid"]
    assert r["pid"] != r["container_pid"]  # the host's pid (see the hook test for its check)
    assert r["rusage"]["maxrss_kb"] > 0 and r["rusage"]["utime"] >= 0
    t = r["timings"]
    assert 0 <= t["queued"] <= t["spawn"] <= t["total"]


def test_starts_nobody_asked_for_travel_with_the_exit(box, container, tmp_path):
    """Without start hooks or event subscribers a worker reports a quick command's start
    inside its exit, and a slower one's on its own after a moment: both replies carry
    the same pids and timings, and the spawn histogram counts both."""
    sup = SupervisorProcess(box.root, str(tmp_path))
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            for argv in (["sh", "-c", "echo $$"], ["sh", "-c", "sleep 0.2; echo $$"]):
                r = c.exec(container, argv)
                assert int(r["stdout"]) == r["container_pid"] and r["pid"] != r["container_pid"]
                t = r["timings"]
                assert 0 <= t["queued"] <= t["spawn"] <= t["total"]
            assert t["total"] - t["spawn"] >= 200_000  # the sleep ran after the spawn
            text = urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics",
                                          timeout=5).read().decode()
            labels = f'container="{container}",namespace="",pod=""'
            assert f"warmexec_exec_spawn_seconds_count{{{labels}}} 2.0" in text
    finally:
        assert sup.stop() == 0


def test_metrics_without_the_container_label(box, container, tmp_path):
    """container_label = false (hosts with thousands of containers): execs that exit,
    time out and fail are all answered and counted, without a container label."""
    sup = SupervisorProcess(box.root, str(tmp_path), "container_label = false\n")
    try:
        with Client(sup.endpoint) as c:
            wait_ready(c, container)
            assert c.exec(container, ["sh", "-c", "exit 3"])["exit_code"] == 3
            assert c.exec(container, ["sleep", "5"], timeout=0.2)["timed_out"]
            text = urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics",
                                          timeout=5).read().decode()
            assert 'warmexec_exec_exits_total{code="3"} 1.0' in text
            assert "warmexec_exec_timeouts_total 1.0" in text
            assert "warmexec_exec_spawn_seconds_count 2.0" in text
            assert 'container="' not in text
    finally:
        assert sup.stop() == 0


def test_large_argv_and_env_reach_the_command(client, container):
    """Well past a socketpair's default datagram limit (208 KiB), within execve's."""
    env = {f"BIG{i}": str(i) * 100_000 for i in range(3)}
    r = client.exec(container, ["sh", "-c", 'echo ${#BIG0} ${#BIG2} $#', "sh", *["x" * 50_000] * 3],
                    env=env)
    assert r["exit_code"] == 0 and r["stdout"] == b"100000 100000 3\n"


def test_stdin_and_output_capture(client, container):
    data = os.urandom(300_000)
    r = client.exec(container, ["cat"], stdin=data, capture=1 << 20)
    assert r["stdout"] == data and not r["truncated"]
    r = client.exec(container, ["sh", "-c", "echo out; echo err >&2"])
    assert (r["stdout"], r["stderr"]) == (b"out\n", b"err\n")


def test_output_flood_is_truncated(client, container):
    r = client.exec(container, ["sh", "-c", "head -c 50000000 /dev/zero; echo done >&2"], capture=1000)
    assert r["exit_code"] == 0 and r["truncated"]
    assert len(r["stdout"]) == 1000 and r["stderr"] == b"done\n"


def test_timeout_kills_the_whole_process_group(box, client, container):
    r = client.exec(container, ["sh", "-c", "sleep 1001 & sleep 1002"], timeout=0.5)
    assert r["timed_out"] and r["signal"] == signal.SIGKILL and r["exit_code"] == 137
    assert not r["oom_killed"]
    def gone():
        ps = box.exec(container, ["ps", "-o", "args"]).stdout.decode()
        return "sleep 1001" not in ps
    wait_for(gone, 5, "the background child to be killed")


def test_many_in_flight_on_one_dealer(client, container):
    ids = [client.submit("exec", container=container, argv=["sh", "-c", f"exit {i % 7}"])
           for i in range(64)]
    codes = [client.result(i)["exit_code"] for i in ids]
    assert codes == [i % 7 for i in range(64)]


def test_req_socket_client(supervisor, container):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10000)
    s.connect(supervisor.endpoint)
    try:
        s.send(codec.pack({"v": 1, "id": "req-1", "op": "exec", "container": container,
                           "argv": ["echo", "hi"]}))
        reply = codec.unpack(s.recv())
    finally:
        s.close()
    assert reply["id"] == "req-1" and reply["ok"] and reply["stdout"] == b"hi\n"


def test_unknown_container(client):
    with pytest.raises(WarmexecError) as e:
        client.exec("no-such-box", ["true"])
    assert e.value.code == errors.NO_SUCH_CONTAINER
    assert e.value.message == "No active container exists with ID no-such-box"


@pytest.mark.parametrize("fields, code", [
    ({"op": "exec", "container": "x", "argv": []}, errors.BAD_REQUEST),
    ({"op": "exec", "container": "x", "argv": "true"}, errors.BAD_REQUEST),
    ({"op": "exec", "container": "x", "argv": ["a\0b"]}, errors.BAD_REQUEST),
    ({"op": "exec", "container": "x", "argv": ["true"], "timeout": True}, errors.BAD_REQUEST),
    ({"op": "exec", "container": "x", "argv": ["true"], "cwd": "relative"}, errors.BAD_REQUEST),
    ({"op": "exec", "container": 5, "argv": ["true"]}, errors.BAD_REQUEST),
    ({"op": "explode"}, errors.BAD_REQUEST),
    ({"v": 2, "op": "ping"}, errors.UNSUPPORTED_VERSION),
])
def test_bad_requests_get_error_replies(supervisor, fields, code):
    reply = _raw(supervisor, codec.pack({"v": 1, "id": 9, **fields}))
    assert reply["ok"] is False and reply["error"]["code"] == code and reply["id"] == 9


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x93\x01\x02\x03", codec.pack("a string")])
def test_garbage_frames_get_error_replies(supervisor, client, payload):
    reply = _raw(supervisor, payload)
    assert reply["ok"] is False and reply["error"]["code"] == errors.BAD_REQUEST
    assert client.ping()["ok"]


def test_unknown_user_is_a_clear_error(client, container):
    with pytest.raises(WarmexecError) as e:
        client.exec(container, ["true"], user="mallory")
    assert e.value.code == errors.NO_SUCH_USER and "mallory" in e.value.message
    assert client.exec(container, ["true"])["exit_code"] == 0


def test_hooks_fire_with_real_pids(hooked_supervisor, hooked_client, hooked_container):
    r = hooked_client.exec(hooked_container, ["sh", "-c", "sleep 1; exit 4"])
    hook_dir = hooked_supervisor.hook_dir

    def docs():
        found = {}
        for name in os.listdir(hook_dir):
            with open(os.path.join(hook_dir, name)) as f:
                try:
                    doc = json.load(f)
                except ValueError:
                    continue
            if doc["pid"] == r["pid"]:
                found[doc["event"]] = doc
        return found if len(found) == 2 else None
    found = wait_for(docs, 10, "start and exit hooks")
    assert found["start"]["container"] == hooked_container and found["start"]["argv"][0] == "sh"
    assert found["start"]["container_pid"] == r["container_pid"]
    # the host pid is the process the hook saw: its innermost pid is the container's
    assert found["start"]["nspid"] == [str(r["pid"]), str(r["container_pid"])]
    assert found["exit"]["exit_code"] == 4


def test_metrics_count_execs(supervisor, client, container):
    client.exec(container, ["sh", "-c", "exit 5"])
    with pytest.raises(WarmexecError):
        client.exec("missing-container", ["true"])
    url = f"http://127.0.0.1:{supervisor.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert f'warmexec_exec_exits_total{{code="5",container="{container}",namespace="",pod=""}}' in text
    assert 'warmexec_exec_errors_total{code="NO_SUCH_CONTAINER"}' in text
    assert "warmexec_exec_spawn_seconds_bucket" in text and 'le="5e-05"' in text
    assert 'warmexec_workers{state="READY"}' in text
    assert "_created" not in text


def _raw(supervisor, payload: bytes) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(supervisor.endpoint)
    try:
        s.send(payload)
        assert s.poll(10000), "no reply"
        return codec.unpack(s.recv())
    finally:
        s.close()
