"""`warmexec cri` in front of a runtime: ExecSync answered from warm workers for the CRI
containers the supervisor serves (real runc containers carrying containerd's CRI
annotations), everything else forwarded.

The runtime here is a small gRPC server of the test's that answers ExecSync with a
marker, so the test can tell who answered; the comparison with containerd's own
ExecSync on a real CRI pod is in test_cri_box.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from warmexec.supervisor import cri

from .conftest import wait_for, wait_ready

pytestmark = pytest.mark.root

CRI_ANNOTATIONS = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "app",
                   "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.sandbox-namespace": "shop"}


class Runtime(grpc.GenericRpcHandler):
    """Stands in for containerd: ExecSync answers exit code 42 with "runtime" on stdout."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def service(self, details):
        self.calls.append(details.method)

        def answer(request, context):
            return cri.encode_exec_sync_response(b"runtime\n", b"", 42)
        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture(scope="module")
def cri_front(box, supervisor, client):
    d = tempfile.mkdtemp(prefix="we-cri-")
    runtime_sock, listen = f"unix://{d}/runtime.sock", f"unix://{d}/cri.sock"
    runtime = Runtime()
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((runtime,))
    server.add_insecure_port(runtime_sock)
    server.start()
    proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "cri", "--listen", listen,
                             "--upstream", runtime_sock, "--endpoint", supervisor.endpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(listen[len("unix://"):]), 15, "the CRI endpoint to listen")
    cfg = box.config()
    cfg["annotations"] = dict(CRI_ANNOTATIONS)
    cid = box.run("cri", cfg)
    wait_ready(client, cid)
    channel = grpc.insecure_channel(listen)
    yield channel, runtime, cid
    channel.close()
    proc.terminate()
    proc.wait(10)
    server.stop(0)
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
    channel, runtime, cid = cri_front
    wait_for(lambda: exec_sync(channel, cid, ["true"])[2] == 0, 10, "the CRI front to know the container")
    out, err, code = exec_sync(channel, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, code) == (b"out\n", b"err\n", 3)
    assert cri.EXEC_SYNC not in runtime.calls  # answered without the runtime


def test_unknown_ids_other_methods_and_commands_that_cannot_start_go_to_the_runtime(cri_front):
    channel, runtime, cid = cri_front
    assert exec_sync(channel, "no-such-container", ["true"]) == (b"runtime\n", b"", 42)
    assert exec_sync(channel, cid, ["/no/such/binary"]) == (b"runtime\n", b"", 42)  # nothing ran
    channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=10)
    assert "/runtime.v1.RuntimeService/Version" in runtime.calls


def test_a_timed_out_exec_sync_is_killed_and_answered_deadline_exceeded(cri_front):
    channel, runtime, cid = cri_front
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        exec_sync(channel, cid, ["sleep", "30"], timeout=1)
    assert e.value.code() == cri.TIMEOUT_STATUS and "timeout 1s exceeded" in e.value.details()
    assert time.monotonic() - t0 < 5
