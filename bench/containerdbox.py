"""A private containerd with busybox containers run by ``ctr``, for tests and bench.

Debian's containerd 1.6 runs with its own config file: root, state, gRPC, ttrpc and
debug sockets and the "opt" plugin's directory under one temp dir, the CRI plugin
disabled (it is not needed and slows the start). As for Docker (bench/enginebox.py) it
runs in a mount namespace of its own with tmpfs over ``/run``: containerd 1.6 puts its
shims' sockets in ``/run/containerd/s/`` whatever the config says.

Containers are ``ctr run -d --rootfs DIR`` of a busybox-static rootfs (no image, no
snapshotter), in the namespace ``warmexec-test``, under the cgroup parent
``/warmexec-ctrd-<suffix>``. Their runc state is where the runc v2 shim is told to keep
it (``--runc-root``, the shim's ``Root`` runc option; the shim adds the namespace):
``<dir>/containerd/runc/warmexec-test/<id>/state.json``. That layout, a root whose
last component is the namespace under a ``runc`` directory under a path with
``containerd`` in it, is the one warmexec names ``NAMESPACE/ID`` (supervisor/names.py),
as it names the default ``/run/containerd/runc/<namespace>``.

``ctr`` runs in the host's namespace with ``--address`` and ``--fifo-dir`` in the temp
dir: its default fifo dir, /run/containerd/fifo, would be made in the host's /run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess

from bench.enginebox import GROUP, PASSWD, TOOLS_PATH, EngineBox, EngineUnavailable, Result
from bench.runcbox import make_rootfs

CONTAINERD = "/usr/bin/containerd"  # dpkg -L containerd
CTR = "/usr/bin/ctr"
NAMESPACE = "warmexec-test"
# `ctr run --rootfs` gives the process no env at all; this is the PATH images set.
IMAGE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)

CONFIG = """version = 2
root = "{dir}/root"
state = "{dir}/state"
{top_level}

[grpc]
  address = "{dir}/engine/containerd.sock"

[ttrpc]
  address = "{dir}/engine/containerd.sock.ttrpc"

[debug]
  address = "{dir}/engine/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
{plugins}"""


class ContainerdUnavailable(EngineUnavailable):
    """This host cannot run the private containerd or its containers; the message says why."""


class ContainerdBox(EngineBox):
    """A private containerd and its ``ctr run`` containers. Raises ContainerdUnavailable
    if it cannot run."""

    namespace = NAMESPACE
    unavailable = ContainerdUnavailable
    dir_prefix = "wectrd-"
    cgroup_prefix = "/warmexec-ctrd-"

    def __init__(self, workdir: str | None = None, start_timeout: float = 30) -> None:
        self.require(CONTAINERD, CTR, what="Debian's containerd")
        super().__init__(workdir, self.dir_prefix, "containerd.log")
        self.config = os.path.join(self.dir, "engine", "config.toml")
        self.address = os.path.join(self.dir, "engine", "containerd.sock")
        self.runc_parent = os.path.join(self.dir, "containerd", "runc")  # the shim's runc Root
        self.runc_root = os.path.join(self.runc_parent, self.namespace)  # where state.json lands
        self.fifo_dir = os.path.join(self.dir, "fifo")
        self.cgroup_parent = self.cgroup_prefix + self.suffix
        self.own_marker = os.path.join(self.dir, "engine", "").encode()  # --config, shims' -address
        self.env = {"PATH": TOOLS_PATH}
        self._exec_ids = itertools.count()
        self.ids: list[str] = []
        try:
            self.rootfs = make_rootfs(os.path.join(self.dir, "rootfs"), PASSWD, GROUP)
            os.makedirs(os.path.join(self.rootfs, "home/app"), exist_ok=True)
            os.chown(os.path.join(self.rootfs, "home/app"), 1000, 1000)
            os.makedirs(os.path.dirname(self.config))
            os.makedirs(self.fifo_dir)
            with open(self.config, "w") as f:
                f.write(self.config_text())
            self.spawn([CONTAINERD, "--config", self.config], (), self.env, self._answers, start_timeout)
            self._check()
        except BaseException:
            self.cleanup()
            raise
        os.makedirs(self.runc_root, exist_ok=True)  # a watcher needs the root before the first container

    def config_text(self) -> str:
        """containerd's config.toml: CONFIG with the CRI plugin disabled."""
        return CONFIG.format(dir=self.dir, top_level='disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                             plugins="")

    def _check(self) -> None:
        """Can this host run a container at all (cgroups, the shim, runc)?"""
        probe = self.run("probe", command=("true",), check=False)
        if probe.returncode != 0:
            raise ContainerdUnavailable(f"ctr run fails here: {probe.stderr.strip()}")
        self.remove("probe")

    def _answers(self) -> bool:
        if not os.path.exists(self.address):
            return False
        return self.ctr("version", check=False, timeout=5).returncode == 0

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """ctr against this containerd, in its namespace."""
        out = subprocess.run([CTR, "--address", self.address, "--namespace", self.namespace, *args],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, env=self.env,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def run(self, cid: str, *options: str, command: tuple[str, ...] = ("sleep", "1d"),
            env: tuple[str, ...] = IMAGE_ENV, check: bool = True) -> subprocess.CompletedProcess:
        """``ctr run -d --null-io --rootfs ROOTFS CID COMMAND`` with the box's runc root,
        fifo dir and cgroup parent. options go before the rootfs (``--cwd``, ``--env``...)."""
        self.ids.append(cid)
        envs = [a for e in env for a in ("--env", e)]
        return self.ctr("run", "-d", "--null-io", "--rootfs", "--runc-root", self.runc_parent,
                        "--fifo-dir", self.fifo_dir, "--cgroup", f"{self.cgroup_parent}/{cid}", *envs,
                        *options, self.rootfs, cid, *command, check=check)

    def exec(self, cid: str, argv: list[str], *, user: str | None = None, cwd: str | None = None,
             timeout: float = 30) -> Result:
        """``ctr task exec --exec-id X [--user U] [--cwd D] CID ARGV``: the reference a
        warmexec exec on a containerd container is compared with. ctr has no ``-e``."""
        opts = ["--fifo-dir", self.fifo_dir, "--exec-id", f"x{os.getpid()}-{next(self._exec_ids)}"]
        if user is not None:
            opts += ["--user", user]
        if cwd is not None:
            opts += ["--cwd", cwd]
        out = self.ctr("task", "exec", *opts, cid, *argv, check=False, timeout=timeout)
        return Result(out.returncode, out.stdout, out.stderr)

    def info(self, cid: str) -> dict:
        return json.loads(self.ctr("container", "info", cid).stdout)

    def init_pid(self, cid: str) -> int:
        with open(os.path.join(self.runc_root, cid, "state.json")) as f:
            return json.load(f)["init_process_pid"]

    def remove(self, *cids: str) -> None:
        """The task killed and deleted, then the container."""
        for cid in cids:
            self.ctr("task", "delete", "--force", cid, check=False, timeout=30)
            self.ctr("container", "delete", cid, check=False, timeout=30)
            if cid in self.ids:
                self.ids.remove(cid)

    def cleanup(self) -> None:
        """Containers, containerd and its shims, mounts, cgroups, the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remove(*list(self.ids))
            except subprocess.TimeoutExpired:
                pass
        self.stop_daemon()
        self.clean_host()
