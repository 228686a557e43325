"""Who may exec: CurveZMQ on a TCP endpoint, and per-key access lists."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from bench.harness import free_port
from warmexec.protocol import Client, errors
from warmexec.protocol.errors import WarmexecError

from .conftest import CurveSupervisor, wait_ready

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def curve(box, tmp_path_factory):
    """A supervisor on tcp://127.0.0.1 with CurveZMQ, two authorised keys and an ACL."""
    allowed, denied = box.run("curve-allowed"), box.run("curve-denied")
    sup = CurveSupervisor(box, str(tmp_path_factory.mktemp("keys")),
                          'containers = ["*-allowed"]\nusers = [""]\nprivileged = false\nadmin = false',
                          strangers=("stranger",))  # the stranger's key is not authorised
    try:
        with sup.client("admin") as c:
            wait_ready(c, allowed)
            wait_ready(c, denied)
        yield sup.client, allowed, denied
    finally:
        assert sup.stop() == 0
        box.delete(allowed)
        box.delete(denied)


def test_authorised_key_without_acl_may_do_everything(curve):
    client, allowed, denied = curve
    with client("admin") as c:
        assert c.exec(denied, ["true"], privileged=True, user="alice")["exit_code"] == 0


def test_acl_limits_containers_users_privileged_and_admin(curve):
    client, allowed, denied = curve
    with client("monitor") as c:
        assert c.exec(allowed, ["true"])["exit_code"] == 0
        for kwargs, what in (({"container": denied}, denied), ({"user": "alice"}, "alice"),
                             ({"privileged": True}, "privileged")):
            target = kwargs.pop("container", allowed)
            with pytest.raises(WarmexecError) as e:
                c.exec(target, ["true"], **kwargs)
            assert e.value.code == errors.FORBIDDEN and what in e.value.message
        with pytest.raises(WarmexecError) as e:
            c.detach(allowed)
        assert e.value.code == errors.FORBIDDEN


def test_unauthorised_key_gets_no_answer(curve):
    client, allowed, _ = curve
    with client("stranger") as c:  # ZAP refuses the handshake: nothing is ever delivered
        with pytest.raises(WarmexecError) as e:
            c.call("ping", timeout=2)
        assert e.value.code in (errors.TIMEOUT, errors.UNREACHABLE)


def test_tcp_without_auth_is_refused(box, tmp_path):
    r = subprocess.run([sys.executable, "-m", "warmexec.supervisor.cli", "serve", "--runc-root", box.root,
                        "--endpoint", f"tcp://127.0.0.1:{free_port()}"],
                       capture_output=True, timeout=30)
    assert r.returncode != 0 and b"needs [auth]" in r.stderr


def test_default_style_ipc_endpoint_is_root_only(supervisor):
    """The unix socket needs no key: only root can reach it (0700 directory, 0600 socket)."""
    path = supervisor.endpoint[len("ipc://"):]
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_ipc_directory_is_created_0700(box, tmp_path):
    endpoint = f"ipc://{tmp_path}/fresh/dir/warmexec.sock"
    proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "serve", "--runc-root",
                             box.root, "--endpoint", endpoint], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(endpoint) as c:
            assert c.ping(timeout=10)["ok"]
        assert stat.S_IMODE(os.stat(f"{tmp_path}/fresh/dir").st_mode) == 0o700
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
