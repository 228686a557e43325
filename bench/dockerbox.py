"""A private Docker daemon with busybox containers, for tests and bench.

Debian's docker.io (dockerd 20.10, which starts its own containerd 1.6 under its exec
root when given no ``--containerd``) runs with every path of its own: data root, exec
root, API socket and pidfile under one temp dir, no iptables, no bridge, no IP
forwarding, and its containers under a cgroup parent named after that dir. The paths
dockerd 20.10 and containerd use whatever the flags say (``/run/containerd/s/`` for shim
sockets, ``/run/docker/plugins``, ``/etc/docker/key.json``, ``/opt/containerd`` of
containerd's "opt" plugin) are private too: the daemon runs in a mount namespace of its
own (bench/enginebox.py: ``unshare --mount``, slave propagation) with tmpfs over
``/run``, ``/etc/docker`` and ``/opt``. Its mounts (overlay rootfs, netns files) stay
in that namespace and vanish with its last process, so nothing touches, or collides
with, a host's own dockerd.

The containers are still ordinary runc containers on the host: their runc state is
under ``runc_root`` (``<exec-root>/runtime-runc/moby`` for Docker 20.10), which is
where warmexec is pointed with ``--runc-root``. The image is imported offline from a
busybox-static rootfs. Binaries are Debian's, by path: another ``docker`` may come
first in PATH (this machine has one in /usr/local/bin).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from urllib.parse import quote

from bench.enginebox import GROUP, PASSWD, TOOLS_PATH, EngineBox, EngineUnavailable, Result
from bench.runcbox import make_rootfs

__all__ = ["DOCKER", "DOCKERD", "GROUP", "PASSWD", "DockerBox", "DockerUnavailable", "Result"]

DOCKER = "/usr/bin/docker"    # dpkg -L docker.io
DOCKERD = "/usr/sbin/dockerd"
# Host directories dockerd 20.10 and the containerd it starts write whatever the flags
# say: /etc/docker/key.json, and containerd's "opt" plugin makes /opt/containerd.
PRIVATE_DIRS = ("/etc/docker", "/opt")


class DockerUnavailable(EngineUnavailable):
    """This host cannot run the private daemon or its containers; the message says why."""


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class DockerBox(EngineBox):
    """A private dockerd and its containers. Raises DockerUnavailable if it cannot run."""

    image = "warmexec-busybox:latest"
    unavailable = DockerUnavailable

    def __init__(self, workdir: str | None = None, start_timeout: float = 30) -> None:
        self.require(DOCKERD, DOCKER, what="Debian's docker.io")
        super().__init__(workdir, "wedock-", "dockerd.log")
        self.data_root = os.path.join(self.dir, "data")
        self.exec_root = os.path.join(self.dir, "exec")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.host = f"unix://{self.socket}"
        self.runc_root = os.path.join(self.exec_root, "runtime-runc", "moby")
        self.cgroup_parent = "/warmexec-docker-" + self.suffix
        # containerd's --config and the shims' -address are under it; a warmexec watching
        # our runc root names <exec-root>/runtime-runc and is not ours to end.
        self.own_marker = os.path.join(self.exec_root, "containerd", "").encode()
        self.env = {"PATH": TOOLS_PATH, "DOCKER_CONFIG": os.path.join(self.dir, "cli")}
        try:
            self._start(start_timeout)
            self._import_image()
            # Can this host run a container at all (cgroups, seccomp, overlay)?
            ran = self.docker("run", "--rm", "--network", "none", self.image, "true", check=False)
            if ran.returncode != 0:
                raise DockerUnavailable(f"docker run fails here: {ran.stderr.strip()}")
        except BaseException:
            self.cleanup()
            raise
        os.makedirs(self.runc_root, exist_ok=True)  # a watcher needs the root before the first container

    def _start(self, timeout: float) -> None:
        os.makedirs(self.data_root)
        os.makedirs(self.exec_root)
        config = os.path.join(self.dir, "daemon.json")
        with open(config, "w") as f:
            f.write("{}\n")  # never the host's /etc/docker/daemon.json
        cmd = [DOCKERD, "--config-file", config, "--data-root", self.data_root,
               "--exec-root", self.exec_root, "--host", self.host,
               "--pidfile", os.path.join(self.dir, "docker.pid"),
               "--iptables=false", "--ip6tables=false", "--bridge=none", "--ip-forward=false",
               "--ip-masq=false", "--cgroup-parent", self.cgroup_parent, "--shutdown-timeout", "2"]
        self.spawn(cmd, PRIVATE_DIRS, self.env, self._answers, timeout)

    def _answers(self) -> bool:
        try:
            return self.api("GET", "/_ping", timeout=1)[0] == 200
        except OSError:
            return False

    def _import_image(self) -> None:
        rootfs = make_rootfs(os.path.join(self.dir, "rootfs"), PASSWD, GROUP)
        os.makedirs(os.path.join(rootfs, "home/app"), exist_ok=True)
        os.chown(os.path.join(rootfs, "home/app"), 1000, 1000)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([DOCKER, "-H", self.host, "import", "-", self.image], stdin=tar.stdout,
                                  capture_output=True, text=True, env=self.env, timeout=60)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise DockerUnavailable(f"docker import failed: {imported.stderr.strip()}")

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """The docker CLI against this daemon."""
        out = subprocess.run([DOCKER, "-H", self.host, *args], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, env=self.env, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def api(self, method: str, path: str, timeout: float = 10) -> tuple[int, object]:
        """One Engine API call; (status, the JSON body, or a list of JSON lines for a stream)."""
        conn = _UnixHTTP(self.socket, timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        if "json" not in resp.getheader("Content-Type", ""):
            return resp.status, body
        if path.startswith("/events"):  # a stream: one JSON object a line
            return resp.status, [json.loads(line) for line in body.splitlines() if line.strip()]
        return resp.status, json.loads(body)

    def events(self, since: float, until: float, **filters: list[str]) -> list[dict]:
        query = f"/events?since={since:.6f}&until={until:.6f}"
        if filters:
            query += "&filters=" + quote(json.dumps(filters))
        return self.api("GET", query)[1]

    def run(self, name: str, *options: str, image: str | None = None,
            command: tuple[str, ...] = ("sleep", "1d")) -> str:
        """``docker run -d --name NAME --network none OPTIONS IMAGE COMMAND``; the full 64-char id.

        ``--network none``: with ``--bridge=none`` the default network is a stub whose
        sandbox dockerd 20.10 loses at a restart (a rename then fails "sandbox not found")."""
        return self.docker("run", "-d", "--name", name, "--network", "none", *options, image or self.image,
                           *command).stdout.strip()

    def exec(self, target: str, argv: list[str], *, user: str | None = None,
             env: dict[str, str] | None = None, cwd: str | None = None, timeout: float = 30) -> Result:
        """``docker exec``: the reference a warmexec exec on a Docker container is compared with."""
        opts = []
        if user is not None:
            opts += ["-u", user]
        for k, v in (env or {}).items():
            opts += ["-e", f"{k}={v}"]
        if cwd is not None:
            opts += ["-w", cwd]
        out = self.docker("exec", *opts, target, *argv, check=False, timeout=timeout)
        return Result(out.returncode, out.stdout, out.stderr)

    def inspect(self, target: str) -> dict:
        return json.loads(self.docker("inspect", target).stdout)[0]

    def remove(self, *targets: str) -> None:
        if targets:
            self.docker("rm", "-f", *targets, check=False)

    def cleanup(self) -> None:
        """Containers, the daemon and its containerd and shims, mounts, cgroups, the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remove(*self.docker("ps", "-aq", check=False, timeout=30).stdout.split())
            except subprocess.TimeoutExpired:
                pass
        self.stop_daemon()
        self.clean_host()
