"""`warmexec cri` in front of a real containerd 1.6 CRI: the same ExecSync answers as
containerd's own, case by case (test_cri_box.py records those), on the same container.

A private containerd with its CRI plugin (bench/cribox.py) runs a host-network pod with
a busybox container; a warmexec supervisor watches its runc root, and `warmexec cri`
listens in front of containerd's CRI socket. Each case is asked of containerd directly
and through warmexec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import cri_stubs
from bench.cribox import CriBox, CriUnavailable

from .conftest import SupervisorProcess, stop_cleanly, wait_for, wait_ready

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
