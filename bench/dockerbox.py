"""A private Docker daemon with busybox containers, for tests and bench.

Debian's docker.io (dockerd 20.10, which starts its own containerd 1.6 under its exec
root when given no ``--containerd``) runs with every path of its own: data root, exec
root, API socket and pidfile under one temp dir, no iptables, no bridge, no IP
forwarding, and its containers under a cgroup parent named after that dir. Three paths
dockerd 20.10 and containerd use whatever the flags say (``/run/containerd/s/`` for shim
sockets, ``/run/docker/plugins``, ``/etc/docker/key.json``) are private too: the daemon
runs in a mount namespace of its own (``unshare --mount``, slave propagation) with
tmpfs over ``/run`` and ``/etc/docker``. Its mounts (overlay rootfs, netns files) stay
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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import NamedTuple
from urllib.parse import quote

from bench.runcbox import make_rootfs

DOCKER = "/usr/bin/docker"    # dpkg -L docker.io
DOCKERD = "/usr/sbin/dockerd"
TOOLS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # dockerd finds containerd, runc, docker-init here

# The image's users: app's primary group 1000 and a supplementary group extra (2000),
# the case where docker and containerd add the primary gid to the supplementary groups.
PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
app:x:1000:1000:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
daemon:x:1:
app:x:1000:
extra:x:2000:app
nogroup:x:65534:
"""

# Private /run and /etc/docker for the daemon, then dockerd itself in the same pid (-n: no
# /run/mount/utab on the host's /run).
NAMESPACE_SCRIPT = """set -e
mount -n -t tmpfs -o mode=0755 warmexec-docker-run /run
if [ -d /etc/docker ]; then mount -n -t tmpfs -o mode=0700 warmexec-docker-etc /etc/docker; fi
exec "$@"
"""


class DockerUnavailable(Exception):
    """This host cannot run the private daemon or its containers; the message says why."""


class Result(NamedTuple):
    code: int
    stdout: str
    stderr: str


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class DockerBox:
    """A private dockerd and its containers. Raises DockerUnavailable if it cannot run."""

    image = "warmexec-busybox:latest"

    def __init__(self, workdir: str | None = None, start_timeout: float = 30) -> None:
        for tool in (DOCKERD, DOCKER, shutil.which("unshare") or "unshare"):
            if not os.access(tool, os.X_OK):
                raise DockerUnavailable(f"{tool} not found (Debian's docker.io, util-linux)")
        if os.geteuid() != 0:
            raise DockerUnavailable("dockerd needs root")
        self.dir = workdir or tempfile.mkdtemp(prefix="wedock-", dir="/tmp")  # short socket paths
        self.data_root = os.path.join(self.dir, "data")
        self.exec_root = os.path.join(self.dir, "exec")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.host = f"unix://{self.socket}"
        self.runc_root = os.path.join(self.exec_root, "runtime-runc", "moby")
        self.cgroup_parent = "/warmexec-docker-" + os.path.basename(self.dir).rsplit("-", 1)[-1]
        self.log_path = os.path.join(self.dir, "dockerd.log")
        self.env = {"PATH": TOOLS_PATH, "DOCKER_CONFIG": os.path.join(self.dir, "cli")}
        self.proc: subprocess.Popen | None = None
        self.start_seconds = 0.0
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
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "slave", "sh", "-c", NAMESPACE_SCRIPT,
                 "dockerd", *cmd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env)
        deadline = started + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise DockerUnavailable(f"dockerd exited {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerUnavailable(f"dockerd did not answer within {timeout}s: {self.log_tail()}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - started

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

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-size:]
        except OSError:
            return ""

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
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._delete_leftovers()
        self._end_strays()
        self._unmount()
        self._remove_cgroups()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _delete_leftovers(self) -> None:
        """Containers the daemon did not remove (it died first): through runc itself."""
        if os.path.isdir(self.runc_root):
            for cid in os.listdir(self.runc_root):
                subprocess.run(["runc", "--root", self.runc_root, "delete", "--force", cid],
                               capture_output=True, timeout=30)

    def _end_strays(self) -> None:
        """containerd and shims still running with our containerd's paths in their command line."""
        deadline = time.monotonic() + 10
        while (pids := self._own_pids()) and time.monotonic() < deadline:
            sig = signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def _own_pids(self) -> list[int]:
        # containerd's --config and the shims' -address are under it; a warmexec watching
        # our runc root names <exec-root>/runtime-runc and is not ours to end.
        marker = os.path.join(self.exec_root, "containerd", "").encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
            except OSError:
                continue
            if marker in cmdline and not zombie:
                pids.append(int(entry))
        return pids

    def _unmount(self) -> None:
        """Anything mounted under our dir in the host's namespace (none, unless a daemon
        was started without its own mount namespace): deepest first, lazily."""
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(self.dir + "/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def _remove_cgroups(self) -> None:
        base = "/sys/fs/cgroup"
        tops = [os.path.join(base, self.cgroup_parent.lstrip("/"))]
        if os.path.isdir(base):
            tops += [os.path.join(base, h, self.cgroup_parent.lstrip("/")) for h in os.listdir(base)]
        for top in tops:
            if not os.path.isdir(top):
                continue
            for d, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
