"""What the private container engines of tests and bench share (bench/dockerbox.py,
bench/containerdbox.py).

Each engine runs with every path of its own under one temp dir, in a mount namespace of
its own (``unshare --mount``, slave propagation) with tmpfs over ``/run`` and over the
host directories it would otherwise write whatever its flags say (containerd 1.6 puts
its shims' sockets in ``/run/containerd/s/`` unconditionally). Its mounts stay in that
namespace and vanish with its last process. The containers are ordinary runc
containers on the host, their runc state under a root in the temp dir (visible to a
warmexec in the host's namespace), their cgroups under a parent named after the dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

TOOLS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the engines find containerd, runc, shims here

# The users of the engines' images: app's primary group 1000 and a supplementary group
# extra (2000), the case where docker and containerd add the primary gid to the
# supplementary groups.
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

# A private /run, a tmpfs over each existing directory named before "--", then the
# engine itself in the same pid (-n: no /run/mount/utab on the host's /run).
NAMESPACE_SCRIPT = """set -e
mount -n -t tmpfs -o mode=0755 warmexec-engine-run /run
while [ "$1" != "--" ]; do
    if [ -d "$1" ]; then mount -n -t tmpfs -o mode=0700 warmexec-engine-private "$1"; fi
    shift
done
shift
exec "$@"
"""


class EngineUnavailable(Exception):
    """This host cannot run the private engine or its containers; the message says why."""


class Result(NamedTuple):
    code: int
    stdout: str
    stderr: str


class EngineBox:
    """One private engine daemon: its temp dir, log, process, runc root and cgroup parent.

    A subclass sets ``runc_root``, ``cgroup_parent`` and ``own_marker`` (bytes in the
    command line of the engine's processes, and of no warmexec watching its root)."""

    runc_root: str
    cgroup_parent: str
    own_marker: bytes
    unavailable: type[EngineUnavailable] = EngineUnavailable

    def __init__(self, workdir: str | None, prefix: str, log_name: str) -> None:
        if os.geteuid() != 0:
            raise self.unavailable(f"{log_name.split('.')[0]} needs root")
        self.dir = workdir or tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short socket paths
        self.suffix = os.path.basename(self.dir).rsplit("-", 1)[-1]
        self.log_path = os.path.join(self.dir, log_name)
        self.proc: subprocess.Popen | None = None
        self.start_seconds = 0.0

    @classmethod
    def require(cls, *tools: str, what: str) -> None:
        for tool in (*tools, shutil.which("unshare") or "unshare"):
            if not os.access(tool, os.X_OK):
                raise cls.unavailable(f"{tool} not found ({what}, util-linux)")

    def spawn(self, cmd: Sequence[str], private: Sequence[str], env: dict[str, str],
              answers: Callable[[], bool], timeout: float) -> None:
        """Start cmd in a mount namespace of its own (tmpfs over /run and each existing
        directory of private); wait until answers(). Sets start_seconds."""
        name = os.path.basename(cmd[0])
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "slave", "sh", "-c", NAMESPACE_SCRIPT, name,
                 *private, "--", *cmd],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = started + timeout
        while not answers():
            if self.proc.poll() is not None:
                raise self.unavailable(f"{name} exited {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise self.unavailable(f"{name} did not answer within {timeout}s: {self.log_tail()}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - started

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-size:]
        except OSError:
            return ""

    def stop_daemon(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def clean_host(self) -> None:
        """After the daemon: leftover containers, stray shims, mounts, cgroups, the temp dir."""
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
        """containerd and shims still running with our paths in their command line."""
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
            if self.own_marker in cmdline and not zombie:
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
