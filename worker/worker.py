"""A worker: one process per (container, credential profile), already what an exec'd
process must be.

Forked by the zygote (single-threaded, so setns into a mount or user namespace is
allowed), a worker

1. dies with the zygote (PR_SET_PDEATHSIG) and is non-dumpable before it touches the
   container (CVE-2016-9962);
2. takes a pidfd on the container's init and checks its start time against pid reuse;
3. moves itself into every cgroup of the container, writing ``0`` to each
   ``cgroup.procs`` while it still sees the host's /sys/fs/cgroup, and opens the few
   host files it needs later (its own fdinfo directory in the host's procfs, /dev/null);
4. joins all the container's namespaces that differ from ours in one
   ``setns(pidfd, flags)``: all or none. The pid and time namespaces apply to its
   children only, so the worker itself stays outside the container's pid namespace
   (invisible to the container's processes) while every command it starts is inside;
5. resolves the profile's user in the container's own /etc files and takes the
   profile's credentials (:mod:`creds`), then serves execs (:mod:`spawner`): each is a
   posix_spawn that inherits namespaces, cgroups and credentials.

When the container's init exits (its pidfd polls readable) the worker says so and exits.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

from ..protocol import ipc
from . import creds, linux
from .spawner import Spawner
from .users import UnknownUser


def worker_main(sock: socket.socket, spec: dict, user: str | None, privileged: bool,
                zygote_pid: int) -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote_pid:
        return
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    try:
        joined = join(spec)
        profile = creds.make_profile(spec["process"], user, privileged)
    except UnknownUser as exc:
        return ipc.send(sock, {"op": "fatal", "code": "NO_SUCH_USER", "errno": 0, "message": str(exc)})
    except creds.Refused as exc:
        return ipc.send(sock, {"op": "fatal", "code": "SPAWN_FAILED", "errno": 0, "message": str(exc)})
    except OSError as exc:
        return _fatal(sock, exc, "cannot join container")
    for target in (0, 1, 2):  # nothing of the supervisor's (logs, terminal) stays open
        os.dup2(joined["devnull"], target)
    os.close(joined["devnull"])
    try:
        creds.apply(profile)
    except OSError as exc:
        return _fatal(sock, exc, "cannot take the exec's credentials", code="SPAWN_FAILED")
    # A uid change clears the parent-death signal and the dumpable flag: set both again.
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    if os.getppid() != zygote_pid:
        return
    ipc.send(sock, {"op": "ready", "pid": os.getpid(), "uid": profile["uid"], "gid": profile["gid"]})
    Spawner(sock, spec, profile, joined["fdinfo"], joined["pidfd"]).run()


def _fatal(sock: socket.socket, exc: OSError, what: str, code: str = "") -> None:
    ipc.send(sock, {"op": "fatal", "code": code, "errno": exc.errno or 0,
                    "message": f"{what}: {exc.strerror or exc}"})


def join(spec: dict) -> dict:
    """Everything of the host side first, then one setns into the container."""
    init_pid = spec["init_pid"]
    pidfd = os.pidfd_open(init_pid)
    if spec.get("init_start") is not None and start_time(init_pid) != spec["init_start"]:
        raise OSError(errno.ESRCH, "container init pid was reused (start time differs)")
    fdinfo = os.open("/proc/self/fdinfo", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    adj = spec["process"].get("oom_score_adj")
    if adj is not None:
        _write("/proc/self/oom_score_adj", str(adj).encode())
    for path in spec["cgroup_procs"]:
        _write(path, b"0")  # "0" is the writer itself
    flags = 0
    for name in spec["namespaces"]:
        flags |= linux.NAMESPACES[name]
    if flags:
        linux.setns(pidfd, flags)
    if spec.get("keyring"):
        linux.join_session_keyring(spec["keyring"])
    return {"pidfd": pidfd, "fdinfo": fdinfo, "devnull": devnull}


def _write(path: str, data: bytes) -> None:
    """Plain fd I/O: a text file object costs each worker memory (io, codecs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), the value runc records."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])
