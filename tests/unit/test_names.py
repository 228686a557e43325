"""Names users know containers by: Docker names, containerd and Kubernetes aliases, id prefixes."""

from __future__ import annotations

import pytest

from warmexec.protocol import errors
from warmexec.protocol.errors import WarmexecError
from warmexec.supervisor.discovery import Container
from warmexec.supervisor.names import DockerInfo, Names, _listed, aliases, engine, image

CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "app",
       "io.kubernetes.cri.sandbox-name": "web-0", "io.kubernetes.cri.sandbox-namespace": "shop",
       "io.kubernetes.cri.image-name": "docker.io/library/busybox:latest"}


def info(cid: str, source: str, labels: dict | None = None) -> Container:
    return Container(id=cid, init_pid=1, init_start=None, namespaces=[], cgroup_procs=[], process={},
                     source=source, labels=labels or {})


@pytest.mark.parametrize("source,labels,expected", [
    ("/run/docker/runtime-runc/moby", None, ("docker", None)),
    ("/tmp/x/exec-root/runtime-runc/moby/", None, ("docker", None)),
    ("/run/containerd/runc/default", None, ("containerd", "default")),
    ("/run/containerd/runc/k8s.io", CRI, ("cri", "k8s.io")),
    ("/run/crun", None, ("crun", None)),
    ("/run/crun", {"io.kubernetes.cri-o.ContainerType": "container"}, ("cri-o", None)),  # CRI-O's roots
    ("/run/runc", {"io.kubernetes.cri-o.ContainerType": "sandbox"}, ("cri-o", None)),
    ("/run/runc", None, ("runc", None)),
    ("/var/run/elsewhere", {"bundle": "/run/containerd/io.containerd.runtime.v2.task/ns1/c"},
     ("containerd", "ns1")),
    ("/srv/x/runtime-runc/moby", {"bundle": "/srv/x/containerd/daemon/io.containerd.runtime.v2.task/moby/c"},
     ("docker", None)),
    ("attach", None, ("attached", None)),
])
def test_engine_from_the_state_root(source, labels, expected):
    assert engine(info("c", source, labels)) == expected


def test_aliases_of_containerd_and_kubernetes_containers():
    assert aliases(info("abc", "/run/containerd/runc/default")) == ["default/abc"]
    assert aliases(info("abc", "/run/containerd/runc/k8s.io", CRI)) == ["k8s.io/abc", "shop/web-0/app"]
    assert aliases(info("abc", "/run/runc")) == []
    assert image(info("abc", "/run/containerd/runc/k8s.io", CRI), None) == "docker.io/library/busybox:latest"


def test_resolve_by_id_name_alias_and_unique_prefix():
    names = Names()
    ids = ["4f1c2a" + "0" * 58, "4f9b00" + "1" * 58, "e3d2" + "2" * 60]
    names.set_docker({ids[0]: DockerInfo("web", "busybox"), ids[1]: DockerInfo("db", "busybox")})
    names.add(info(ids[2], "/run/containerd/runc/k8s.io", CRI))
    assert names.resolve("web", ids) == ids[0] and names.resolve("/db", ids) == ids[1]
    assert names.resolve("shop/web-0/app", ids) == ids[2] and names.resolve(f"k8s.io/{ids[2]}", ids) == ids[2]
    assert names.resolve("4f1c", ids) == ids[0] and names.resolve("e", ids) == ids[2]
    assert names.resolve("nope", ids) is None
    with pytest.raises(WarmexecError) as e:
        names.resolve("4f", ids)
    assert e.value.code == errors.AMBIGUOUS and ids[0] in e.value.message and ids[1] in e.value.message
    assert names.name(ids[0]) == "web" and names.name(ids[2]) == "shop/web-0/app"


def test_names_follow_renames_and_removals():
    names = Names()
    cid = "a" * 64
    names.set_docker({cid: DockerInfo("old", "busybox")})
    names.set_docker({cid: DockerInfo("new", "busybox")})  # the list after a rename event
    assert names.resolve("new", [cid]) == cid and names.resolve("old", []) is None
    names.add(info("b" * 64, "/run/containerd/runc/default"))
    names.remove("b" * 64)
    assert names.resolve("default/" + "b" * 64, []) is None


def test_the_engine_list_is_read_as_docker_gives_it():
    rows = [{"Id": "a" * 64, "Names": ["/web"], "Image": "busybox"}, {"Id": "b" * 64, "Names": []}]
    assert _listed(rows) == {"a" * 64: DockerInfo("web", "busybox")}


def test_an_alias_two_containers_claim_names_neither():
    """Annotations come with a container's spec: a pod cannot take another's name."""
    names = Names()
    one, two = "a" * 64, "b" * 64
    names.add(info(one, "/run/containerd/runc/k8s.io", CRI))
    names.add(info(two, "/run/containerd/runc/k8s.io", CRI))
    with pytest.raises(WarmexecError) as e:
        names.resolve("shop/web-0/app", [one, two])
    assert e.value.code == errors.AMBIGUOUS and one in e.value.message and two in e.value.message
    names.remove(two)
    assert names.resolve("shop/web-0/app", [one]) == one


def test_an_exec_by_another_tool_into_a_served_container_makes_no_rescan():
    """`runc exec` rewrites the container's state.json (two events): a served, living
    container's own rewrites change nothing; roots, deletions and new ones do."""
    from warmexec.supervisor import inotify

    live, files = {"c1"}.__contains__, ("state.json",)
    rewrite = [("/run/runc/c1", inotify.IN_CLOSE_WRITE, "runc.Z7Vs3x"),  # as runc exec does it
               ("/run/runc/c1", inotify.IN_DELETE, "runc.Z7Vs3x")]
    assert not inotify.needs_rescan(rewrite, live, files)
    assert inotify.needs_rescan([("/run/runc/c2", inotify.IN_MOVED_TO, "state.json")], live, files)  # new
    assert inotify.needs_rescan([("/run/runc/c1", inotify.IN_DELETE, "state.json")], live, files)
    assert inotify.needs_rescan([("/run/runc/c1", inotify.IN_DELETE_SELF, "")], live, files)
    assert inotify.needs_rescan([("/run/runc", inotify.IN_CREATE, "c3")], live, files)
    assert inotify.needs_rescan([("/run/runc/c1", inotify.IN_MOVED_TO, "state.json")], lambda c: False, files)


def test_an_unwatched_directory_reports_nothing_not_even_its_ignored_event(tmp_path):
    """A served container's directory is unwatched: neither its later events nor the
    IN_IGNORED that inotify_rm_watch queues may look like news (a rescan each)."""
    from warmexec.supervisor import inotify

    root, served = tmp_path / "root", tmp_path / "root" / "c1"
    served.mkdir(parents=True)
    w = inotify.Watcher()
    try:
        w.watch(str(root), inotify.ROOT_EVENTS)
        w.watch(str(served), inotify.DIR_EVENTS)
        w.unwatch(str(served))
        (served / "runc.Z7Vs3x").write_bytes(b"{}")
        (served / "runc.Z7Vs3x").unlink()
        assert w.drain() == []
        (root / "c2").mkdir()  # the root is still watched
        assert [(p, name) for p, _, name in w.drain()] == [(str(root), "c2")]
        w.watch(str(served), inotify.DIR_EVENTS)  # let go of: watched again
        (served / "state.json").write_bytes(b"{}")
        assert [(p, name) for p, _, name in w.drain()] == [(str(served), "state.json")]
    finally:
        w.close()
