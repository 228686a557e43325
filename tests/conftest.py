"""Fixtures: real runc containers under a private root, a real supervisor process.

No mocks on the exec path. Waits are on conditions with deadlines, never bare sleeps.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.harness import SupervisorProcess, wait_for, wait_ready  # noqa: F401 - re-exported
from bench.runcbox import RuncBox
from warmexec.protocol import Client

HAVE_ROOT = os.geteuid() == 0 and shutil.which("runc") is not None and shutil.which("busybox") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root, runc and busybox-static")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


class Supervisor(SupervisorProcess):
    """The harness's supervisor with a hooks directory for the hook tests.

    Its periodic rescan is an hour apart: every container the tests start is found
    through inotify alone, so the tests prove that path.
    """

    def __init__(self, box: RuncBox, workdir: str, config: str = "") -> None:
        self.hook_dir = os.path.join(workdir, "hooks")
        os.makedirs(self.hook_dir, exist_ok=True)
        super().__init__(box.root, workdir, config, scan_interval=3600)


HOOK_SCRIPT = """import json, sys, os
doc = json.load(sys.stdin)
try:  # the host's view of the pid, while the process may still run
    with open("/proc/%s/status" % doc["pid"]) as f:
        doc["nspid"] = [l.split()[1:] for l in f if l.startswith("NSpid:")][0]
except (OSError, IndexError, TypeError):
    doc["nspid"] = None
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
    assert sup.stop() == 0
    assert "internal error" not in sup.read_log(), "the supervisor logged an internal error"


@pytest.fixture(scope="session")
def client(supervisor):
    c = Client(supervisor.endpoint)
    yield c
    c.close()


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
