"""A private containerd with its CRI plugin on, a pod and a container in it, for the CRI
tests and benchmark (issue 13: Kubernetes exec probes through CRI ExecSync).

The daemon is bench/containerdbox.py's (Debian's containerd 1.6, its own root, state,
sockets and "opt" dir under one temp dir, in a mount namespace of its own with tmpfs
over ``/run``) with the CRI plugin enabled and every path the plugin would write
pointed into the temp dir as well:

- the CRI endpoint is containerd's own gRPC socket (``socket``: ``unix://<dir>/engine/
  containerd.sock``); the plugin's root and state are under containerd's;
- runc state: the CRI runtime's ``Root`` option (``runtimes.runc.options``) is the box's
  ``<dir>/containerd/runc``, where the runc v2 shim adds the namespace: a container's
  state is ``<dir>/containerd/runc/k8s.io/<id>/state.json`` (``runc_root``), not the
  host's ``/run/containerd/runc/k8s.io``. The layout is the one warmexec names
  ``k8s.io/ID`` and ``NAMESPACE/POD/CONTAINER`` (supervisor/names.py);
- CNI: ``bin_dir`` and ``conf_dir`` in the temp dir (containerd makes the conf dir at
  start, ``/etc/cni/net.d`` by default) and left empty. The plugin then reports
  NetworkReady false (``cni config load failed: no network config found``) and runs
  pods whose network namespace is NODE without calling CNI; a pod on a network of its
  own fails (UNKNOWN ``failed to setup network for sandbox "ID": cni plugin not
  initialized``, its netns made under the state dir, ``netns_mounts_under_state_dir``);
- pod logs: the pod's ``log_directory`` under the temp dir (the kubelet's is
  ``/var/log/pods/NAMESPACE_NAME_UID``); the streaming server on 127.0.0.1, port 0;
  registry ``config_path`` in the temp dir (never read: nothing is pulled);
- ``restrict_oom_score_adj``: root here lacks CAP_SYS_RESOURCE, and the plugin would
  give the sandbox -998 (it gets containerd's own score, 0 here); ``disable_apparmor``
  (no profile is loaded into a host kernel); cgroupfs (``SystemdCgroup = false``), the
  pod's ``cgroup_parent`` under the box's own ``/warmexec-cri-<suffix>``; the overlayfs
  snapshotter (``snapshotter=`` to change it), its mounts made by containerd and the
  shims inside the box's mount namespace.

The image is built offline: the busybox-static rootfs of bench/runcbox.py written as a
Docker archive by Python (one layer, a config with Env and Cmd ``sleep 1d``, a
manifest.json naming ``IMAGE``) and ``ctr -n k8s.io images import``-ed, unpacked into
the CRI plugin's snapshotter. The same image is the ``sandbox_image``: the pod's
sandbox ("pause") container runs ``sleep 1d``.

Then, over gRPC on the CRI socket, as the kubelet would: RunPodSandbox (metadata,
labels and annotations of a pod, host network), CreateContainer (the busybox image,
``sleep 1d``, env, the kubelet's labels and annotations, BestEffort's oom_score_adj
1000), StartContainer. ``exec_sync`` is containerd's own CRI ExecSync. ``cleanup()``
stops and removes the containers and pods through CRI, then the daemon, its shims,
mounts, cgroups and the temp dir (bench/enginebox.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import uuid

from bench import cri_stubs
from bench.containerdbox import CONFIG, IMAGE_ENV, ContainerdBox, ContainerdUnavailable

IMAGE = "docker.io/warmexec/busybox:cri"  # what ctr import names the archive's warmexec/busybox:cri
RUNC = "/usr/sbin/runc"
# A container's own env beside the image's, of the kind the kubelet adds.
DEFAULT_ENV = {"WARMEXEC_CRI": "1", "KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}

CRI_CONFIG = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_parent}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dir}/cni/bin"
    conf_dir = "{dir}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{dir}/certs.d"
"""


class CriUnavailable(ContainerdUnavailable):
    """This host cannot run the private containerd's CRI plugin, its pod or its container;
    the message says why (the tests skip with it)."""


def write_image_archive(rootfs: str, path: str, ref: str, cmd: list[str], env: tuple[str, ...]) -> str:
    """A Docker archive (``docker save``'s format) of one layer, rootfs, tagged ref (without
    the ``docker.io/`` ctr adds): what ``ctr images import`` takes. Returns path."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(os.listdir(rootfs)):
            t.add(os.path.join(rootfs, name), arcname=name)
    layer_bytes = layer.getvalue()
    diff_id = hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {"Env": list(env), "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": "warmexec bench/cribox.py: busybox-static rootfs"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref.removeprefix("docker.io/")],
                            "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as t:
        for name, data in ((f"{diff_id}/layer.tar", layer_bytes), (config_name, config),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            t.addfile(info, io.BytesIO(data))
    return path


class CriBox(ContainerdBox):
    """A private containerd with CRI, one host-network pod (``pod_id``) and one running
    container in it (``container_id``). Raises CriUnavailable if it cannot run."""

    namespace = "k8s.io"  # the CRI plugin's containerd namespace
    unavailable = CriUnavailable
    dir_prefix = "wecri-"
    cgroup_prefix = "/warmexec-cri-"
    image = IMAGE

    def __init__(self, workdir: str | None = None, start_timeout: float = 30, snapshotter: str = "overlayfs",
                 pod_name: str = "probe-pod", pod_namespace: str = "default",
                 container_name: str = "app") -> None:
        self.snapshotter = snapshotter
        self.pod_name, self.pod_namespace, self.container_name = pod_name, pod_namespace, container_name
        self.pod_uid = str(uuid.uuid4())
        self.pod_id = self.container_id = ""
        self.pods: list[str] = []
        self.containers: list[str] = []
        self.timings: dict[str, float] = {}
        self._channel = None
        try:
            self.stubs = cri_stubs.load()
        except cri_stubs.StubsUnavailable as exc:
            raise CriUnavailable(str(exc)) from exc
        self.pb = self.stubs.pb
        super().__init__(workdir, start_timeout)

    # --- the daemon (ContainerdBox's, with these hooks)

    @property
    def socket(self) -> str:
        """The CRI endpoint: containerd's own gRPC socket."""
        return "unix://" + self.address

    @property
    def pod_log_dir(self) -> str:
        return os.path.join(self.dir, "pods", f"{self.pod_namespace}_{self.pod_name}_{self.pod_uid}")

    def config_text(self) -> str:
        cri = CRI_CONFIG.format(dir=self.dir, image=self.image, snapshotter=self.snapshotter, runc=RUNC,
                                runc_parent=self.runc_parent)
        return CONFIG.format(dir=self.dir, top_level="", plugins=cri)

    def _answers(self) -> bool:
        """CRI answers Version (the plugin refuses every call until it is initialised)."""
        if not os.path.exists(self.address):
            return False
        if self._channel is None:
            self._channel = cri_stubs.channel(self.socket)
            self.runtime = self.stubs.rpc.RuntimeServiceStub(self._channel)
            self.images = self.stubs.rpc.ImageServiceStub(self._channel)
        try:
            self.version = self.runtime.Version(self.pb.VersionRequest(version="v1"), timeout=2)
        except Exception:  # grpc.RpcError: not listening yet, or "server is not initialized yet"
            return False
        return True

    def _check(self) -> None:
        """The image imported, the pod and the container started: this host can run CRI pods."""
        self.timings["daemon"] = self.start_seconds
        started = time.monotonic()
        self._import_image()
        self.timings["image"] = time.monotonic() - started
        try:
            started = time.monotonic()
            self.pod_id = self.run_pod()
            self.timings["pod"] = time.monotonic() - started
            started = time.monotonic()
            self.container_id = self.create_container(self.container_name)
            self.start_container(self.container_id)
            self.timings["container"] = time.monotonic() - started
        except Exception as exc:  # grpc.RpcError
            why = f"CRI cannot run a pod here: {_rpc_error(exc)}: {self.log_tail(1500)}"
            raise CriUnavailable(why) from exc

    def _import_image(self) -> None:
        archive = write_image_archive(self.rootfs, os.path.join(self.dir, "image.tar"), self.image,
                                      ["sleep", "1d"], IMAGE_ENV)
        out = self.ctr("images", "import", "--snapshotter", self.snapshotter, archive, check=False,
                       timeout=120)
        if out.returncode != 0:
            raise CriUnavailable(f"ctr images import failed: {out.stderr.strip()}")
        os.unlink(archive)

    # --- pods and containers, as the kubelet asks for them

    def pod_config(self):
        pb = self.pb
        labels = {"io.kubernetes.pod.name": self.pod_name, "io.kubernetes.pod.namespace": self.pod_namespace,
                  "io.kubernetes.pod.uid": self.pod_uid}
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=self.pod_name, uid=self.pod_uid, namespace=self.pod_namespace,
                                           attempt=0),
            log_directory=self.pod_log_dir, labels=labels,
            annotations={"kubernetes.io/config.source": "api",
                         "kubernetes.io/config.seen": "2024-01-01T00:00:00Z"},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/pod{self.pod_uid}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=self._namespaces())))

    def _namespaces(self):
        """A hostNetwork pod's, as the kubelet sets them: the node's network, a pod IPC
        namespace, a pid namespace per container."""
        pb = self.pb
        return pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)

    def run_pod(self) -> str:
        os.makedirs(self.pod_log_dir, exist_ok=True)
        pod_id = self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=self.pod_config()),
                                            timeout=60).pod_sandbox_id
        self.pods.append(pod_id)
        return pod_id

    def create_container(self, name: str, command: tuple[str, ...] = ("sleep", "1d"),
                         env: dict[str, str] | None = None, seccomp: str = "unconfined",
                         run_as_user: int | None = None) -> str:
        """CreateContainer in the box's pod: the image, command (as a pod's ``command``),
        env (a default of the kubelet's kind), seccomp ``unconfined`` (the kubelet's
        default) or ``runtime/default``."""
        pb = self.pb
        if env is None:
            env = DEFAULT_ENV
        profile = {"unconfined": pb.SecurityProfile.Unconfined,
                   "runtime/default": pb.SecurityProfile.RuntimeDefault}[seccomp]
        security = pb.LinuxContainerSecurityContext(
            namespace_options=self._namespaces(), seccomp=pb.SecurityProfile(profile_type=profile),
            masked_paths=["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            readonly_paths=["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"])
        if run_as_user is not None:
            security.run_as_user.value = run_as_user
        labels = {"io.kubernetes.container.name": name, "io.kubernetes.pod.name": self.pod_name,
                  "io.kubernetes.pod.namespace": self.pod_namespace, "io.kubernetes.pod.uid": self.pod_uid}
        annotations = {"io.kubernetes.container.hash": "5d6a3c1e",
                       "io.kubernetes.container.restartCount": "0",
                       "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
                       "io.kubernetes.container.terminationMessagePolicy": "File",
                       "io.kubernetes.pod.terminationGracePeriod": "30"}
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0), image=pb.ImageSpec(image=self.image),
            command=list(command), envs=[pb.KeyValue(key=k, value=v.encode()) for k, v in env.items()],
            labels=labels, annotations=annotations, log_path=f"{name}/0.log",
            linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(oom_score_adj=1000),
                                          security_context=security))
        request = pb.CreateContainerRequest(pod_sandbox_id=self.pod_id, config=config,
                                            sandbox_config=self.pod_config())
        cid = self.runtime.CreateContainer(request, timeout=60).container_id
        self.containers.append(cid)
        return cid

    def start_container(self, cid: str) -> None:
        self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=cid), timeout=60)

    def remove_container(self, cid: str) -> None:
        self.runtime.StopContainer(self.pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
        self.runtime.RemoveContainer(self.pb.RemoveContainerRequest(container_id=cid), timeout=60)
        if cid in self.containers:
            self.containers.remove(cid)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        if pod_id in self.pods:
            self.pods.remove(pod_id)

    # --- what the tests use

    def exec_sync(self, cid: str, cmd: list[str], timeout: int = 0,
                  rpc_timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """containerd's CRI ExecSync: (exit_code, stdout, stderr); a grpc.RpcError as it
        comes. The call's own deadline is timeout + 30 s (none for timeout 0) unless given."""
        if rpc_timeout is None and timeout > 0:
            rpc_timeout = timeout + 30
        r = self.runtime.ExecSync(self.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
                                  timeout=rpc_timeout)
        return r.exit_code, r.stdout, r.stderr

    def state_path(self, cid: str) -> str:
        return os.path.join(self.runc_root, cid, "state.json")

    def cleanup(self) -> None:
        """Containers and pods through CRI, then ContainerdBox's: the daemon and its shims,
        mounts, cgroups, the temp dir."""
        if self.proc is not None and self.proc.poll() is None and self._channel is not None:
            for cid in list(self.containers):
                try:
                    self.remove_container(cid)
                except Exception:  # grpc.RpcError: the daemon's leftovers go through runc
                    self.containers.remove(cid)
            for pod_id in list(self.pods):
                try:
                    self.remove_pod(pod_id)
                except Exception:
                    self.pods.remove(pod_id)
        if self._channel is not None:
            self._channel.close()
        super().cleanup()


def _rpc_error(exc: Exception) -> str:
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return repr(exc)
