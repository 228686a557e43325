"""`warmexec cri` in front of a runtime: ExecSync answered from warm workers for the CRI
containers the supervisor serves (real runc containers carrying containerd's CRI
annotations), everything else forwarded.

The runtime here is a small gRPC server of the test's that answers ExecSync with a
marker, so the test can tell who answered; the comparison with containerd's own
ExecSync on a real CRI pod is in test_cri_box.py."""

from __future__ import annotations

import os
import stat
import time

import grpc
import pytest

from warmexec.supervisor import cri

from .conftest import wait_for, wait_ready
from .crifront import CRI_ANNOTATIONS, Front, exec_sync

pytestmark = pytest.mark.root

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
