"""A real `warmexec serve` process on a private endpoint, for tests, bench and demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from warmexec.protocol import Client


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll cond until it returns something true, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_ready(client: Client, cid: str, timeout: float = 15.0) -> dict:
    """Wait until the supervisor lists cid with a READY worker; return its row."""
    def ready() -> dict | None:
        return next((r for r in client.list() if r["id"] == cid and r["state"] == "READY"), None)
    return wait_for(ready, timeout, f"the worker of {cid} to be READY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SupervisorProcess:
    """`warmexec serve` watching one runc root, its log in workdir/supervisor.log."""

    def __init__(self, runc_root: str, workdir: str, config: str = "", metrics: bool = True,
                 log_level: str = "DEBUG", scan_interval: float | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/warmexec.sock"
        self.metrics_port = free_port() if metrics else None
        self.config = os.path.join(workdir, "warmexec.toml")
        with open(self.config, "w") as f:
            f.write(config)
        self.log_path = os.path.join(workdir, "supervisor.log")
        cmd = [*wrapper, sys.executable, "-m", "warmexec.supervisor.cli", "serve", "--runc-root", runc_root,
               "--endpoint", self.endpoint, "--config", self.config, "--log-level", log_level]
        if scan_interval is not None:
            cmd += ["--scan-interval", str(scan_interval)]
        if metrics:
            cmd += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        with Client(self.endpoint) as client:
            wait_for(lambda: self._ping(client), 15, "the supervisor to answer")

    def _ping(self, client: Client) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.read_log()}")
        try:
            client.ping(timeout=0.5)
            return True
        except Exception:  # noqa: BLE001 - not answering yet
            return False

    def read_log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
