"""The Node.js example client (protocol/clients/node/, npm's zeromq and @msgpack/msgpack)
runs a streamed exec against a real supervisor: output events in order, credit given
back (the output is many windows long), stdin streamed, the exit code."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from .conftest import REPO

pytestmark = pytest.mark.root

NODE_DIR = os.path.join(REPO, "protocol", "clients", "node")


def _node_ready() -> str | None:
    """Why the client cannot run here, or None. Installs its packages if npm can."""
    if shutil.which("node") is None:
        return "node is not installed (setup.sh installs Debian's nodejs)"
    check = ["node", "-e", "import('zeromq').then(() => import('@msgpack/msgpack'))"]
    if subprocess.run(check, cwd=NODE_DIR, capture_output=True, timeout=60).returncode == 0:
        return None
    if shutil.which("npm") is None:
        return "npm is not installed (setup.sh installs Debian's npm)"
    r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
                       timeout=300)
    if r.returncode != 0 or subprocess.run(check, cwd=NODE_DIR, capture_output=True, timeout=60).returncode:
        return f"npm could not install zeromq and @msgpack/msgpack: {r.stderr.decode()[-300:]}"
    return None


@pytest.fixture(scope="module")
def node():
    reason = _node_ready()
    if reason is not None:
        pytest.skip(reason)


def _run(supervisor, container, *argv: str, flags: tuple[str, ...] = (), stdin: bytes = b""):
    r = subprocess.run(["node", "example.mjs", supervisor.endpoint, container, *flags, "--", *argv],
                       cwd=NODE_DIR, input=stdin, capture_output=True, timeout=120)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    return r, events


def _data(events, stream: int) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e["event"] == "output"
                    and e["stream"] == stream)


def test_a_streamed_exec_from_node_with_credit(node, supervisor, container):
    window = 64 << 10  # 2 MB of output: thirty windows, so credit must come back
    r, events = _run(supervisor, container, "sh", "-c", "seq 1 300000; echo done >&2; exit 5",
                     flags=("--window", str(window)))
    assert r.returncode == 5, r.stderr
    assert events[0]["event"] == "started" and events[0]["pid"] > 0
    assert events[-1] == {"event": "exit", "exit_code": 5, "signal": None}
    outputs = [e for e in events if e["event"] == "output"]
    assert [e["seq"] for e in outputs] == list(range(len(outputs)))
    assert _data(events, 1) == "".join(f"{i}\n" for i in range(1, 300001)).encode()
    assert _data(events, 2) == b"done\n"


def test_stdin_streamed_from_node_comes_back(node, supervisor, container):
    payload = os.urandom(3 << 20)
    r, events = _run(supervisor, container, "sha256sum", flags=("--stdin",), stdin=payload)
    assert r.returncode == 0, r.stderr
    assert _data(events, 1).split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_an_error_reply_reaches_node(node, supervisor):
    r, events = _run(supervisor, "no-such-container", "true")
    assert r.returncode == 125 and events == []
    assert b"NO_SUCH_CONTAINER" in r.stderr
