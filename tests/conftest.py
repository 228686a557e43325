"""Fixtures: real runc containers under a private root, a real supervisor process.

No mocks on the exec path. Waits are on conditions with deadlines, never bare sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.runcbox import RuncBox  # noqa: E402
from warmexec.protocol import Client  # noqa: E402

HAVE_ROOT = os.geteuid() == 0 and shutil.which("runc") is not None and shutil.which("busybox") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root, runc and busybox-static")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def wait_for(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    """A real `warmexec serve` process on a private endpoint and runc root."""

    def __init__(self, box: RuncBox, workdir: str, extra_config: str = "") -> None:
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/warmexec.sock"
        self.metrics_port = free_port()
        self.hook_dir = os.path.join(workdir, "hooks")
        os.makedirs(self.hook_dir, exist_ok=True)
        self.config = os.path.join(workdir, "warmexec.toml")
        with open(self.config, "w") as f:
            f.write(extra_config)
        self.log = open(os.path.join(workdir, "supervisor.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmexec.supervisor.cli", "serve", "--runc-root", box.root,
             "--endpoint", self.endpoint, "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
             "--config", self.config, "--scan-interval", "0.1", "--log-level", "DEBUG"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = Client(self.endpoint)
        try:
            wait_for(lambda: self._ping(client), 15, "supervisor to answer")
        finally:
            client.close()

    def _ping(self, client: Client) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {self.proc.returncode}: {self.read_log()}")
        try:
            client.ping(timeout=0.5)
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def read_log(self) -> str:
        with open(os.path.join(self.workdir, "supervisor.log"), "rb") as f:
            return f.read().decode(errors="replace")[-5000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


HOOK_SCRIPT = """import json, sys, os
doc = json.load(sys.stdin)
name = "%s-%s.json" % (sys.argv[1], doc["exec_id"])
with open(os.path.join(sys.argv[2], name), "w") as f:
    json.dump(doc, f)
"""


@pytest.fixture(scope="session")
def box():
    b = RuncBox()
    yield b
    b.cleanup()


@pytest.fixture(scope="session")
def supervisor(box, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sup"))
    hook = os.path.join(workdir, "hook.py")
    with open(hook, "w") as f:
        f.write(HOOK_SCRIPT)
    hooks_dir = os.path.join(workdir, "hooks")
    cfg = (f'[[hooks.start]]\ncommand = ["{sys.executable}", "{hook}", "start", "{hooks_dir}"]\n'
           f'timeout = 10\n'
           f'[[hooks.exit]]\ncommand = ["{sys.executable}", "{hook}", "exit", "{hooks_dir}"]\n')
    sup = Supervisor(box, workdir, cfg)
    yield sup
    sup.stop()


@pytest.fixture(scope="session")
def client(supervisor):
    c = Client(supervisor.endpoint)
    yield c
    c.close()


def wait_ready(client: Client, cid: str, timeout: float = 15.0) -> dict:
    def ready():
        for row in client.list():
            if row["id"] == cid and row["state"] == "READY":
                return row
        return None
    return wait_for(ready, timeout, f"worker of {cid} to be READY")


@pytest.fixture(scope="session")
def container(box, client):
    """The default busybox container (runc spec defaults), warm."""
    cid = box.run("default")
    wait_ready(client, cid)
    return cid


@pytest.fixture
def tmpdir_short():
    d = tempfile.mkdtemp(prefix="we-")
    yield d
    shutil.rmtree(d, ignore_errors=True)
