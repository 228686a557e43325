"""`warmexec cri` in front of a runtime: ExecSync answered from warm workers for the CRI
containers the supervisor serves (real runc containers carrying containerd's CRI
annotations), everything else forwarded.

The runtime here is a small gRPC server of the test's that answers ExecSync with a
marker, so the test can tell who answered; the comparison with containerd's own
ExecSync on a real CRI pod is in test_cri_box.py."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bench.cri_stubs import CHANNEL_OPTIONS
from bench.harness import free_port
from warmexec.supervisor import cri

from .conftest import wait_for, wait_ready

pytestmark = pytest.mark.root

CRI_ANNOTATIONS = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "app",
                   "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.sandbox-namespace": "shop"}


class Runtime(grpc.GenericRpcHandler):
    """Stands in for a runtime: ExecSync answers exit code 42 with "runtime" on stdout;
    Version names the runtime ``name`` (field 2, runtime_name)."""

    def __init__(self, name: str = "containerd") -> None:
        self.calls: list[str] = []
        self.name = name

    def service(self, details):
        self.calls.append(details.method)

        def answer(request, context):
            if details.method == cri.VERSION:
                return b"\x0a\x050.1.0\x12" + bytes([len(self.name)]) + self.name.encode()
            return cri.encode_exec_sync_response(b"runtime\n", b"", 42)
        return grpc.unary_unary_rpc_method_handler(answer)


class Front:
    """A stand-in runtime on a socket of mode 0640 and `warmexec cri` in front of it, with
    its metrics on a port of its own."""

    def __init__(self, supervisor, name: str = "containerd", *args: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="we-cri-rest-")
        self.runtime_sock, self.listen = f"unix://{self.dir}/runtime.sock", f"unix://{self.dir}/cri.sock"
        self.runtime = Runtime(name)
        self.server = grpc.server(ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((self.runtime,))
        self.server.add_insecure_port(self.runtime_sock)
        self.server.start()
        os.chmod(self.runtime_sock[len("unix://"):], 0o640)
        self.metrics_port = free_port()
        self.supervisor = supervisor
        self.args = args
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "cri", "--listen",
                                      self.listen, "--upstream", self.runtime_sock, "--endpoint",
                                      self.supervisor.endpoint, "--metrics-addr",
                                      f"127.0.0.1:{self.metrics_port}", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.listen[len("unix://"):]), 15, "the CRI endpoint to listen")
        self.channel = grpc.insecure_channel(self.listen, options=CHANNEL_OPTIONS)

    def stop(self) -> int:
        self.channel.close()
        self.proc.terminate()
        return self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.server.stop(0)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the proxy's own metrics, read over HTTP (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
            if m and m.group(1) == name and (m.group(2) or "") == want:
                return float(m.group(3))
        return 0.0


@pytest.fixture(scope="module")
def cri_front(box, supervisor, client):
    front = Front(supervisor)
    cfg = box.config()
    cfg["annotations"] = dict(CRI_ANNOTATIONS)
    cid = box.run("cri", cfg)
    wait_ready(client, cid)
    yield front.channel, front.runtime, cid, front
    front.close()
    box.delete(cid)


def exec_sync(channel, cid: str, cmd: list[str], timeout: int = 0) -> tuple[bytes, bytes, int]:
    request = (b"\x0a" + bytes([len(cid)]) + cid.encode()
               + b"".join(b"\x12" + bytes([len(a)]) + a.encode() for a in cmd)
               + (b"\x18" + bytes([timeout]) if timeout else b""))
    reply = channel.unary_unary(cri.EXEC_SYNC)(request, timeout=30)
    out = {1: b"", 2: b"", 3: 0}
    for number, _, value in cri._fields(reply):
        out[number] = value
    code = out[3] - (1 << 64) if out[3] >= 1 << 63 else out[3]
    return out[1], out[2], code


def test_exec_sync_of_a_served_cri_container_is_warmexec_s(cri_front):
    channel, runtime, cid, _ = cri_front
    wait_for(lambda: exec_sync(channel, cid, ["true"])[2] == 0, 10, "the CRI front to know the container")
    out, err, code = exec_sync(channel, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, code) == (b"out\n", b"err\n", 3)
    assert cri.EXEC_SYNC not in runtime.calls  # answered without the runtime


def test_unknown_ids_other_methods_and_commands_that_cannot_start_go_to_the_runtime(cri_front):
    channel, runtime, cid, _ = cri_front
    assert exec_sync(channel, "no-such-container", ["true"]) == (b"runtime\n", b"", 42)
    assert exec_sync(channel, cid, ["/no/such/binary"]) == (b"runtime\n", b"", 42)  # nothing ran
    channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=10)
    assert "/runtime.v1.RuntimeService/Version" in runtime.calls


def test_a_timed_out_exec_sync_is_killed_and_answered_deadline_exceeded(cri_front):
    channel, runtime, cid, _ = cri_front
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        exec_sync(channel, cid, ["sleep", "30"], timeout=1)
    assert e.value.code() == cri.TIMEOUT_STATUS and "timeout 1s exceeded" in e.value.details()
    assert time.monotonic() - t0 < 5


def test_the_socket_takes_the_runtime_s_owner_and_mode(cri_front):
    *_, front = cri_front
    ours, theirs = (os.stat(s[len("unix://"):]) for s in (front.listen, front.runtime_sock))
    assert stat.S_ISSOCK(ours.st_mode)
    assert (stat.S_IMODE(ours.st_mode), ours.st_uid, ours.st_gid) == (0o640, theirs.st_uid, theirs.st_gid)


def test_each_execsync_is_counted_by_path_and_reason_over_http(cri_front):
    channel, runtime, cid, front = cri_front
    wait_for(lambda: exec_sync(channel, cid, ["true"])[2] == 0, 10, "the CRI front to know the container")

    def count(path: str, reason: str) -> float:
        return front.metric("warmexec_cri_execsync_total", path=path, reason=reason)
    cases = [(cid, ["true"], "warm", "served"),
             ("no-such-container", ["true"], "upstream", "unknown_container"),
             (cid, [], "upstream", "empty_cmd"), (cid, ["/no/such/binary"], "upstream", "cannot_start")]
    before = {(p, r): count(p, r) for *_, p, r in cases}
    calls = front.metric("warmexec_cri_execsync_duration_seconds_count", path="upstream")
    for c, cmd, *_ in cases:
        exec_sync(channel, c, cmd)
    for *_, path, reason in cases:
        assert count(path, reason) == before[path, reason] + 1, (path, reason)
    assert front.metric("warmexec_cri_execsync_duration_seconds_count", path="upstream") == calls + 3
    assert front.metric("warmexec_cri_upstream_info", kind="containerd") == 1  # from the runtime's Version


@pytest.fixture(scope="module")
def crio_front(box, supervisor, client):
    """The same container behind a runtime whose Version says cri-o."""
    front = Front(supervisor, "cri-o")
    cfg = box.config()
    cfg["annotations"] = {"io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.pod.name": "web-1",
                          "io.kubernetes.pod.namespace": "shop",
                          "io.kubernetes.container.name": "app"}
    cid = box.run("crio", cfg)
    wait_ready(client, cid)
    wait_for(lambda: exec_sync(front.channel, cid, ["true"])[2] == 0, 10, "the proxy to know the container")
    yield front, cid
    front.close()
    box.delete(cid)


def test_a_cri_o_container_is_known_by_its_own_annotations(crio_front, client):
    _, cid = crio_front
    row = next(r for r in client.list() if r["id"] == cid)
    assert (row["engine"], row["cri_container_type"], row["pod"], row["namespace"]) == \
        ("cri-o", "container", "web-1", "shop")


def test_behind_cri_o_a_timeout_is_exit_code_minus_one_and_conmon_s_message(crio_front):
    front, cid = crio_front
    t0 = time.monotonic()
    assert exec_sync(front.channel, cid, ["sh", "-c", "echo started; sleep 30"], timeout=1) == \
        (b"", b"command timed out", -1)
    assert time.monotonic() - t0 < 5
    assert front.metric("warmexec_cri_upstream_info", kind="cri-o") == 1
    assert front.metric("warmexec_cri_execsync_total", path="warm", reason="timed_out") == 1


def test_behind_cri_o_output_is_what_its_16_mib_exec_log_leaves(crio_front):
    """17 MiB of stdout in lines of 1000 bytes: containerd's answer would be
    RESOURCE_EXHAUSTED. CRI-O's is what its 16 MiB exec log holds: each line costs 45
    bytes of timestamp, stream and tag more, so 16054 whole lines and 741 bytes of the
    next fit (16 MiB - 16054 * 1045 = 786 = 45 + 741), and stderr's line none."""
    front, cid = crio_front
    script = "yes $(printf %999s | tr ' ' x) | head -c 17825792; echo e >&2"
    out, err, code = exec_sync(front.channel, cid, ["sh", "-c", script])
    assert (len(out), err, code) == (16054 * 1000 + 741, b"", 0)
    assert out == ((b"x" * 999 + b"\n") * 16055)[:len(out)]


def test_the_proxy_restarted_under_a_running_client(crio_front):
    """The kubelet keeps its channel: a new proxy on the same socket answers it."""
    front, cid = crio_front
    assert front.stop() == 0  # SIGTERM: a clean exit
    front.start()
    channel = front.channel
    wait_for(lambda: _answers(channel, cid), 15, "the restarted proxy to answer")
    assert exec_sync(channel, cid, ["sh", "-c", "exit 5"])[2] == 5


def _answers(channel, cid: str) -> bool:
    try:
        return exec_sync(channel, cid, ["true"])[2] == 0
    except grpc.RpcError:
        return False
