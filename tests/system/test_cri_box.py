"""The CRI fixture (bench/cribox.py) and what containerd 1.6's own CRI ExecSync returns.

A private containerd (Debian's 1.6.20) with its CRI plugin runs a host-network pod and a
busybox container, driven over gRPC through the CRI subset of tests/cri/runtime_subset.proto
as the kubelet drives it. The assertions below are what containerd's ExecSync was seen to
return on this Debian host; they are the targets a warmexec CRI endpoint (issue 13) must
match case by case:

- exit codes and both streams as they are; a signal death is 128+N (137), as a response;
- a command that cannot start (a missing executable, a file without the x bit, a
  directory, an empty cmd): gRPC UNKNOWN, ``failed to exec in container: failed to start
  exec "<a new 64-hex exec id>": OCI runtime exec failed: exec failed: unable to start
  container process: exec: "nonexistent": executable file not found in $PATH: unknown``
  (runc's words: ``stat /bin/x: no such file or directory`` for a missing absolute path,
  ``permission denied`` for no x bit or a directory; ``args must not be empty``);
- a timeout (``timeout=1``, ``sleep 10``): gRPC DEADLINE_EXCEEDED ``failed to exec in
  container: timeout 1s exceeded: context deadline exceeded`` after about 1 s, the
  command killed (SIGKILL) and its output dropped; ``timeout`` 0 or negative: no limit;
- output: the plugin caps each stream at 16 MiB (CVE-2022-31030), but containerd's gRPC
  server also refuses to send a message over 16 MiB (its default ``max_send_message_size``),
  so no capped output ever arrives: any response whose encoding is over 16777216 bytes
  is gRPC RESOURCE_EXHAUSTED ``grpc: trying to send message larger than max (N vs.
  16777216)``, N the encoded size (16777221 for a capped 16 MiB stdout and exit 0). The
  largest stdout that arrives is 16777211 bytes with exit code 0 (the field's tag and
  4-byte length make 16777216), 2 bytes less with another exit code; both streams
  count (9 MB each fails). This is the server's limit, not the client's: ours accepts 64 MiB;
- an unknown container id, and the pod sandbox's id (a runc container under the same
  runc root, refused by the plugin): gRPC NOT_FOUND ``failed to exec in container:
  failed to find container "<id>" in store: not found``;
- ids are resolved as unique prefixes (truncindex): a prefix of one container works,
  an empty id is UNKNOWN ``... failed to find container "" in store: Prefix can't be
  empty``, an ambiguous prefix UNKNOWN ``... Multiple IDs found with provided prefix: P``;
- a container not running: UNKNOWN ``failed to exec in container: container is in
  CONTAINER_EXITED state`` (``CONTAINER_CREATED`` before its start).
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from bench.cribox import CriBox, CriUnavailable

grpc = pytest.importorskip("grpc")

pytestmark = pytest.mark.root

MAX = 16 << 20  # containerd's gRPC max_send_message_size and the plugin's cap of each stream
# A str.format template of a regex: {} is the escaped words of runc's error.
EXEC_FAILED = (r'failed to exec in container: failed to start exec "[0-9a-f]{{64}}": '
               r"OCI runtime exec failed: exec failed: {}: unknown")
START = "unable to start container process: "


@pytest.fixture(scope="module")
def cri():
    try:
        box = CriBox()
    except CriUnavailable as exc:
        pytest.skip(f"no private containerd with CRI on this host: {exc}")
    yield box
    box.cleanup()


def rpc_error(box: CriBox, cid: str, cmd: list[str], timeout: int = 5) -> tuple[object, str]:
    with pytest.raises(grpc.RpcError) as info:
        box.exec_sync(cid, cmd, timeout)
    return info.value.code(), info.value.details()


def test_box_pod_container_and_runc_state(cri):
    pb = cri.pb
    assert (cri.version.runtime_name, cri.version.runtime_api_version) == ("containerd", "v1")
    assert cri.socket == "unix://" + os.path.join(cri.dir, "engine", "containerd.sock")
    # runc state of the sandbox and the container in the box's own root, not /run/containerd
    assert cri.runc_root == os.path.join(cri.dir, "containerd", "runc", "k8s.io")
    for cid in (cri.pod_id, cri.container_id):
        with open(cri.state_path(cid)) as f:
            state = json.load(f)
        assert state["id"] == cid and os.path.exists(f"/proc/{state['init_process_pid']}")
    conditions = {c.type: c for c in cri.runtime.Status(pb.StatusRequest(), timeout=10).status.conditions}
    assert conditions["RuntimeReady"].status
    assert not conditions["NetworkReady"].status  # no CNI config: host-network pods only
    listed = cri.runtime.ListContainers(pb.ListContainersRequest(), timeout=10).containers
    assert [(c.id, c.pod_sandbox_id, c.metadata.name, c.state) for c in listed] == [
        (cri.container_id, cri.pod_id, "app", pb.CONTAINER_RUNNING)]
    assert listed[0].labels["io.kubernetes.pod.name"] == "probe-pod"
    status = cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cri.container_id), timeout=10)
    assert status.status.annotations["io.kubernetes.container.restartCount"] == "0"
    images = cri.images.ListImages(pb.ListImagesRequest(), timeout=10).images
    assert any(cri.image in i.repo_tags for i in images), images


def test_exec_sync_output_and_exit_codes(cri):
    cid = cri.container_id
    assert cri.exec_sync(cid, ["id"], 5) == (0, b"uid=0(root) gid=0(root) groups=0(root)\n", b"")
    assert cri.exec_sync(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"], 5) == (3, b"out\n", b"err\n")
    assert cri.exec_sync(cid, ["sh", "-c", "kill -9 $$"], 5) == (137, b"", b"")
    code, out, _ = cri.exec_sync(cid, ["env"], 0)  # timeout 0: no limit
    assert code == 0 and b"WARMEXEC_CRI=1\n" in out and b"HOSTNAME=" in out
    assert cri.exec_sync(cid[:12], ["true"], 5) == (0, b"", b"")  # a unique prefix
    assert cri.exec_sync(cid, ["true"], -1) == (0, b"", b"")


@pytest.mark.parametrize("cmd,words", [
    (["nonexistent"], START + 'exec: "nonexistent": executable file not found in $PATH'),
    (["/bin/nonexistent"], START + 'exec: "/bin/nonexistent": stat /bin/nonexistent: '
                           "no such file or directory"),
    (["/bin/notexec"], START + 'exec: "/bin/notexec": permission denied'),
    (["/tmp"], START + 'exec: "/tmp": permission denied'),
    ([], "args must not be empty"),
])
def test_exec_sync_cannot_start(cri, cmd, words):
    code, details = rpc_error(cri, cri.container_id, cmd)
    assert code == grpc.StatusCode.UNKNOWN
    assert re.fullmatch(EXEC_FAILED.format(re.escape(words)), details), details


def test_exec_sync_timeout(cri):
    started = time.monotonic()
    code, details = rpc_error(cri, cri.container_id, ["sh", "-c", "echo before; sleep 10"], 1)
    elapsed = time.monotonic() - started
    assert (code, details) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                               "failed to exec in container: timeout 1s exceeded: context deadline exceeded")
    assert 0.9 < elapsed < 5, elapsed
    # killed: no sleep 10 left in the container
    _, ps, _ = cri.exec_sync(cri.container_id, ["ps", "-o", "args"], 5)
    assert b"sleep 10" not in ps and b"sleep 1d" in ps, ps
    assert cri.exec_sync(cri.container_id, ["sleep", "0.3"], 1) == (0, b"", b"")


@pytest.mark.parametrize("script,encoded", [
    (f"head -c {MAX + 1000} /dev/zero", MAX + 5),       # capped to 16 MiB, still too large to send
    (f"head -c {MAX} /dev/zero", MAX + 5),
    (f"head -c {MAX + 1000} /dev/zero >&2", MAX + 5),
    (f"head -c {MAX - 4} /dev/zero", MAX + 1),
    (f"head -c {MAX - 6} /dev/zero; exit 3", MAX + 1),
    ("head -c 9000000 /dev/zero; head -c 9000000 /dev/zero >&2", 18000010),
])
def test_exec_sync_output_over_16_mib_is_resource_exhausted(cri, script, encoded):
    code, details = rpc_error(cri, cri.container_id, ["sh", "-c", script], 30)
    assert (code, details) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"grpc: trying to send message larger than max ({encoded} vs. {MAX})")


def test_exec_sync_largest_output_that_arrives(cri):
    code, out, err = cri.exec_sync(cri.container_id, ["sh", "-c", f"head -c {MAX - 5} /dev/zero"], 30)
    assert (code, len(out), err) == (0, MAX - 5, b"")
    code, out, err = cri.exec_sync(cri.container_id, ["sh", "-c", f"head -c {MAX - 7} /dev/zero; exit 3"], 30)
    assert (code, len(out), err) == (3, MAX - 7, b"")


def test_exec_sync_ids_it_refuses(cri):
    not_found = 'failed to exec in container: failed to find container "{}" in store: not found'
    unknown = "0123456789abcdef" * 4
    for cid in (unknown, "nosuch", cri.pod_id, cri.pod_id[:12]):  # the sandbox is no container to CRI
        assert rpc_error(cri, cid, ["true"]) == (grpc.StatusCode.NOT_FOUND, not_found.format(cid))
    assert rpc_error(cri, "", ["true"]) == (
        grpc.StatusCode.UNKNOWN, "failed to exec in container: failed to find container \"\" in store: "
                                 "Prefix can't be empty")


def test_exec_sync_in_a_container_not_running(cri):
    cid = cri.create_container("later")
    try:
        assert rpc_error(cri, cid, ["true"]) == (
            grpc.StatusCode.UNKNOWN, "failed to exec in container: container is in CONTAINER_CREATED state")
        cri.start_container(cid)
        assert cri.exec_sync(cid, ["true"], 5) == (0, b"", b"")
        cri.runtime.StopContainer(cri.pb.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
        assert rpc_error(cri, cid, ["true"]) == (
            grpc.StatusCode.UNKNOWN, "failed to exec in container: container is in CONTAINER_EXITED state")
    finally:
        cri.remove_container(cid)
