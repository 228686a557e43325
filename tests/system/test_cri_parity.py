"""`warmexec cri` in front of a real containerd 1.6 CRI: the same ExecSync answers as
containerd's own, case by case (test_cri_box.py records those), on the same container.

A private containerd with its CRI plugin (bench/cribox.py) runs a host-network pod with
a busybox container; a warmexec supervisor watches its runc root, and `warmexec cri`
listens in front of containerd's CRI socket. Each case is asked of containerd directly
and through warmexec."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import urllib.request

import pytest

from bench import cri_stubs
from bench.cribox import CriBox, CriUnavailable
from bench.harness import free_port

from .conftest import REPO, SupervisorProcess, stop_cleanly, wait_for, wait_ready

grpc = pytest.importorskip("grpc")

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    try:
        box = CriBox()
    except CriUnavailable as exc:
        pytest.skip(f"no private containerd with CRI on this host: {exc}")
    workdir = str(tmp_path_factory.mktemp("cri-front"))
    sup = SupervisorProcess(box.runc_root, workdir, config='docker_host = ""\n')
    listen = f"unix://{workdir}/cri.sock"
    proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "cri", "--listen", listen,
                             "--upstream", box.socket, "--endpoint", sup.endpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from warmexec.protocol import Client
        with Client(sup.endpoint) as c:
            wait_ready(c, box.container_id)
        wait_for(lambda: os.path.exists(listen[len("unix://"):]), 15, "warmexec cri to listen")
        channel = cri_stubs.channel(listen)
        ours = box.stubs.rpc.RuntimeServiceStub(channel)
        yield box, ours, sup
        channel.close()
    finally:
        proc.terminate()
        proc.wait(10)
        stop_cleanly(sup)
        box.cleanup()


def answer(stub, box: CriBox, cid: str, cmd: list[str], timeout: int = 0):
    """(exit_code, stdout, stderr) or (status code, details) of an RpcError."""
    try:
        r = stub.ExecSync(box.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout), timeout=60)
        return r.exit_code, r.stdout, r.stderr
    except grpc.RpcError as exc:
        return exc.code(), _stable(exc.details())


def execs_run(sup: SupervisorProcess) -> float:
    """How many execs the supervisor ran (its exec exit counter, summed)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("warmexec_exec_exits_total"))


def _stable(details: str) -> str:
    """containerd names each exec with a new random id: the rest is the answer."""
    import re
    return re.sub(r'exec "[0-9a-f]{64}"', 'exec "ID"', details)


CONFINEMENT = ("Uid", "Gid", "Groups", "Cap", "NoNewPrivs", "Seccomp")


@pytest.mark.parametrize("cmd", [["id"], ["sh", "-c", "echo out; echo err >&2; exit 3"],
                                 ["sh", "-c", "kill -9 $$"], ["env"], ["cat", "/proc/self/status"]])
def test_exec_sync_answers_as_containerd(front, cmd):
    box, ours, sup = front
    theirs = answer(box.runtime, box, box.container_id, cmd)
    before = execs_run(sup)
    got = answer(ours, box, box.container_id, cmd)
    assert execs_run(sup) == before + 1  # warmexec's worker ran it, not the runtime
    if cmd == ["cat", "/proc/self/status"]:  # pids and memory differ; the confinement must not
        theirs, got = ([ln for ln in r[1].decode().splitlines() if ln.startswith(CONFINEMENT)]
                       for r in (theirs, got))
    assert got == theirs


@pytest.mark.parametrize("case", ["missing", "not-executable", "empty", "unknown-id", "sandbox", "timeout"])
def test_failures_answer_as_containerd(front, case):
    box, ours, _ = front
    cid, cmd, timeout = {
        "missing": (box.container_id, ["nonexistent"], 0),
        "not-executable": (box.container_id, ["/etc/passwd"], 0),
        "empty": (box.container_id, [], 0),
        "unknown-id": ("f" * 64, ["true"], 0),
        "sandbox": (box.pod_id, ["true"], 0),
        "timeout": (box.container_id, ["sleep", "10"], 1),
    }[case]
    assert answer(ours, box, cid, cmd, timeout) == answer(box.runtime, box, cid, cmd, timeout)


@pytest.mark.parametrize("size", [5 << 20, (16 << 20) + 1])
def test_output_of_megabytes_answers_as_containerd(front, size):
    """5 MiB of stdout comes back whole from both; 16 MiB + 1 byte is kept to 16 MiB by
    both and the reply is then over containerd's 16 MiB: RESOURCE_EXHAUSTED from both,
    with the same sizes in its words."""
    box, ours, sup = front
    cmd = ["sh", "-c", f"head -c {size} /dev/zero; echo done >&2"]
    theirs = answer(box.runtime, box, box.container_id, cmd)
    before = execs_run(sup)
    got = answer(ours, box, box.container_id, cmd)
    assert execs_run(sup) == before + 1  # the warm worker ran it
    if size < 16 << 20:
        assert (len(theirs[1]), theirs[2], theirs[0]) == (size, b"done\n", 0)
    else:
        assert theirs[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert got == theirs


UNIT = os.path.join(REPO, "docs", "systemd", "warmexec-cri.service")


def exec_start(path: str) -> list[str]:
    """The unit's ExecStart as systemd splits it (continuation lines joined)."""
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line[len("ExecStart="):])


def test_the_shipped_unit_runs_as_documented(front, tmp_path):
    """docs/CRI.md's setup: the unit's own command line, its sockets and port moved to
    this test's containerd and supervisor, then one ExecSync through it."""
    box, _, sup = front
    argv = exec_start(UNIT)
    assert argv[:2] == ["/usr/local/bin/warmexec", "cri"]
    port = free_port()
    moved = {"unix:///run/warmexec/cri.sock": f"unix://{tmp_path}/cri.sock",
             "unix:///run/containerd/containerd.sock": box.socket,
             "ipc:///run/warmexec/warmexec.sock": sup.endpoint, "127.0.0.1:9751": f"127.0.0.1:{port}"}
    assert set(moved) <= set(argv), "the unit no longer says what docs/CRI.md says"
    warmexec = os.path.join(os.path.dirname(sys.executable), "warmexec")  # the installed entry point
    proc = subprocess.Popen([warmexec, *(moved.get(a, a) for a in argv[1:])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = f"{tmp_path}/cri.sock"
        wait_for(lambda: os.path.exists(sock), 15, "the unit's warmexec cri to listen")
        ours, containerd = os.stat(sock), os.stat(box.socket[len("unix://"):])
        assert (stat.S_IMODE(ours.st_mode), ours.st_uid, ours.st_gid) == \
            (stat.S_IMODE(containerd.st_mode), containerd.st_uid, containerd.st_gid) == (0o660, 0, 0)
        channel = cri_stubs.channel(f"unix://{sock}")
        stub = box.stubs.rpc.RuntimeServiceStub(channel)
        before = execs_run(sup)
        assert answer(stub, box, box.container_id, ["sh", "-c", "exit 7"]) == (7, b"", b"")
        assert execs_run(sup) == before + 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'warmexec_cri_execsync_total{path="warm",reason="served"} 1.0' in text
        assert 'warmexec_cri_upstream_info{kind="containerd"} 1.0' in text
        channel.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
