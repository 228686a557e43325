"""State roots of other runtimes: crun's layout, from a recorded status file.

crun refuses to run on cgroup v1 hybrid hosts like the test machines, so its state is
written here in crun's own format (``status`` beside a copy of ``config.json``, as crun
1.x writes them) for a real process: the init of a runc container, whose namespaces and
cgroups an exec must then get.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

import pytest

from warmexec.protocol import errors
from warmexec.protocol.errors import WarmexecError

from .conftest import wait_for, wait_ready

pytestmark = pytest.mark.root


def _crun_status(pid: int, bundle: str) -> dict:
    with open(f"/proc/{pid}/stat", "rb") as f:
        start = int(f.read().rsplit(b") ", 1)[1].split()[19])
    with open(f"/proc/{pid}/cgroup") as f:
        path = f.read().splitlines()[0].split(":", 2)[2]
    return {"pid": pid, "process-start-time": start, "cgroup-path": path, "scope": "",
            "rootfs": "rootfs", "systemd-cgroup": False, "bundle": bundle,
            "created": "2026-11-29T00:00:00.000000000Z", "owner": "root", "detached": True,
            "external_descriptors": "[\"/dev/null\",\"/dev/null\",\"/dev/null\"]"}


def test_crun_state_is_discovered_and_execs_match_runc(box, client):
    cid = box.run("crunlike")
    name = "crun-" + cid
    state_dir = os.path.join(box.root, name)  # the test supervisor watches box.root
    try:
        os.makedirs(state_dir)
        cfg = box.bundle_config(cid)
        cfg["process"]["env"].append("FROM_CRUN_CONFIG=yes")
        with open(os.path.join(state_dir, "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(state_dir, "status"), "w") as f:
            json.dump(_crun_status(box.init_pid(cid), os.path.join(box.dir, "bundles", cid)), f)
        wait_ready(client, name)
        probe = "cat /proc/self/cgroup; readlink /proc/self/ns/mnt /proc/self/ns/pid; hostname"
        got = client.exec(name, ["sh", "-c", probe + "; echo $FROM_CRUN_CONFIG"])
        ref = box.exec(cid, ["sh", "-c", probe])
        assert got["stdout"] == ref.stdout + b"yes\n"
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
        wait_for(lambda: all(r["id"] != name for r in client.list()), 10,
                 "the crun container to be dropped with its state")
        box.delete(cid)


def test_kubernetes_annotations_label_metrics_and_series_go_with_the_container(box, client, supervisor):
    cfg = box.config()
    cfg["annotations"] = {"io.kubernetes.cri.sandbox-name": "web-0",
                          "io.kubernetes.cri.sandbox-namespace": "prod",
                          "io.kubernetes.cri.container-name": "app"}
    cid = box.run("k8s", cfg)
    url = f"http://127.0.0.1:{supervisor.metrics_port}/metrics"
    series = f'warmexec_exec_exits_total{{code="0",container="{cid}",namespace="prod",pod="web-0"}}'
    try:
        wait_ready(client, cid)
        assert client.exec(cid, ["true"])["exit_code"] == 0
        assert series in urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        box.delete(cid)
    wait_for(lambda: all(r["id"] != cid for r in client.list()), 10, "the container to go")
    assert f'container="{cid}"' not in urllib.request.urlopen(url, timeout=5).read().decode()


@pytest.mark.skipif(not os.path.exists("/sys/kernel/security/apparmor"),
                    reason="this kernel has no AppArmor (see docs/PARITY.md)")
def test_apparmor_profile_fails_closed(box, client):
    cid = box.run("apparmor", box.config(apparmorProfile="unconfined"))
    try:
        wait_ready(client, cid)
        with pytest.raises(WarmexecError) as e:
            client.exec(cid, ["true"])
        assert e.value.code == errors.SPAWN_FAILED and "AppArmor" in e.value.message
    finally:
        box.delete(cid)
