"""`warmexec cri` in front of a stand-in runtime, for the tests that need a proxy and a
real supervisor but no containerd (test_cri.py, the dashboard's tests)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc

from bench.cri_stubs import CHANNEL_OPTIONS
from bench.harness import free_port, wait_for
from warmexec.supervisor import cri

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
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
            if m and m.group(1) == name and (m.group(2) or "") == want:
                return float(m.group(3))
        return 0.0


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


@contextlib.contextmanager
def proxy_with_a_container(box, supervisor, client, name: str = "cri-dash"):
    """A Front on supervisor and a warm CRI container it answers for, both gone after."""
    from bench.harness import wait_ready

    front = Front(supervisor)
    cfg = box.config()
    cfg["annotations"] = dict(CRI_ANNOTATIONS)
    cid = box.run(name, cfg)
    try:
        wait_ready(client, cid)
        wait_for(lambda: exec_sync(front.channel, cid, ["true"])[2] == 0, 10, "the proxy to serve it")
        yield front, cid
    finally:
        front.close()
        box.delete(cid)
