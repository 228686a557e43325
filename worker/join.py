"""The joiner: the short-lived host-side stage that makes a worker.

Forked by the zygote, a joiner lives in the host's pid namespace, where no process of
the container can see, signal or trace it, and does everything that needs the host or
root before anything of the container can touch it:

1. dies with the zygote (PR_SET_PDEATHSIG) and is non-dumpable (CVE-2016-9962);
2. takes a pidfd on the container's init and checks its start time (pid reuse);
3. moves itself into every cgroup of the container, writing ``0`` to each
   ``cgroup.procs`` while it still sees the host's /sys/fs/cgroup;
4. joins every namespace the container does not share with ours in one
   ``setns(pidfd, flags)``: all or none; then closes the pidfd;
5. resolves the profile's user in the container's own /etc files and takes the
   profile's whole credentials (:mod:`creds`): ids, capabilities, no_new_privs,
   rlimits, umask, seccomp;
6. leaves the supervisor's session and process group (``setsid``: the worker must not
   be able to signal the host's group with ``kill(0, ...)`` or open its terminal as
   ``/dev/tty``), forks the worker (:mod:`worker`) and exits.

The pid namespace a process was told to join applies to its children only, so the
worker is the first warmexec process inside the container's pid namespace, and it is
born already confined: the container sees it only once it holds exactly the
credentials an exec'd process gets, and nothing of the host. Its descriptors are its
socket to the supervisor and the container's own /dev/null (or a pipe) as stdio; its
memory is a copy, shared with no process outside the container; its executable is the
zygote's sealed copy of the interpreter. The joiner sends the worker's host pid and a
pidfd on it to the supervisor (``ready``), which from then on is the only one to kill it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat

from ..protocol import internal, ipc
from . import creds, linux
from .users import UnknownUser
from .worker import ExecLoop

NULL_DEVICE = os.makedev(1, 3)


def joiner_main(sock: socket.socket, seccomp: dict | None, zygote_pid: int) -> None:
    """seccomp: the container's profile as the zygote compiled it; the rest of what to
    join comes from the supervisor: {op: join, spec, user, privileged}."""
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != zygote_pid:
        return
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    msg, fds = ipc.recv(sock)
    for fd in fds:
        os.close(fd)
    if msg is None or msg.get("op") != internal.JOIN:
        return
    spec, user, privileged = msg["spec"], msg["user"], msg["privileged"]
    if seccomp is not None:
        spec["process"]["seccomp"] = seccomp
    try:
        join(spec)
        profile = creds.make_profile(spec["process"], user, privileged)
    except UnknownUser as exc:
        return ipc.send(sock, internal.fatal("NO_SUCH_USER", 0, str(exc)))
    except creds.Refused as exc:
        return ipc.send(sock, internal.fatal("SPAWN_FAILED", 0, str(exc)))
    except OSError as exc:
        return _fatal(sock, exc, "cannot join container")
    null = stdio_from_container()
    try:
        creds.apply(profile)
    except OSError as exc:
        return _fatal(sock, exc, "cannot take the exec's credentials", code="SPAWN_FAILED")
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # a uid change resets it: set it again
    os.setsid()  # a session of our own: no process group or terminal of the host's
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ExecLoop(sock, spec, profile, null).run()
        except BaseException as exc:  # noqa: BLE001 - the child never returns
            os.write(2, f"warmexec worker {spec.get('id')}: {exc!r}\n".encode())
            code = 1
        finally:
            os._exit(code)
    try:
        fds = [os.pidfd_open(pid)]
    except OSError:  # a seccomp allow-list older than pidfd_open: the supervisor opens it
        fds = []
    ipc.send(sock, internal.ready(pid, profile["uid"], profile["gid"]), fds)


def _fatal(sock: socket.socket, exc: OSError, what: str, code: str = "") -> None:
    ipc.send(sock, internal.fatal(code, exc.errno or 0, f"{what}: {exc.strerror or exc}"))


def join(spec: dict) -> None:
    """Everything of the host side first, then one setns into the container."""
    init_pid = spec["init_pid"]
    pidfd = os.pidfd_open(init_pid)
    try:
        if spec.get("init_start") is not None and start_time(init_pid) != spec["init_start"]:
            raise OSError(errno.ESRCH, "container init pid was reused (start time differs)")
        adj = spec["process"].get("oom_score_adj")
        if adj is not None:
            _write("/proc/self/oom_score_adj", str(adj).encode())
        else:
            inherit_oom_score_adj(init_pid, pidfd)
        for path in spec["cgroup_procs"]:
            _write(path, b"0")  # "0" is the writer itself
        flags = 0
        for name in spec["namespaces"]:
            flags |= linux.NAMESPACES[name]
        if flags:
            linux.setns(pidfd, flags)
    finally:
        os.close(pidfd)
    if spec.get("keyring"):
        linux.join_session_keyring(spec["keyring"])


def stdio_from_container() -> bool:
    """Point fds 0-2 at the container's own /dev/null, so that nothing of the host (the
    supervisor's log, a terminal) stays open. The file is the container's and may be
    anything: only a real null device is used (True); otherwise stdio is a pipe with no
    writer (False), and the worker gives each command pipes of its own instead."""
    null = -1
    try:
        null = os.open("/dev/null", os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(null)
        genuine = stat.S_ISCHR(st.st_mode) and st.st_rdev == NULL_DEVICE
    except OSError:
        genuine = False
    if not genuine:
        if null >= 0:
            os.close(null)
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        null = r
    os.set_blocking(null, True)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)
    return genuine


def inherit_oom_score_adj(init_pid: int, pidfd: int) -> None:
    """No oomScoreAdj in the spec: the container's processes have what their engine's
    shim had (containerd's +1), and so does an exec through the engine; take the init's.
    Read through the pid we hold a pidfd on, checked alive after the read (so not a
    reused pid). A value below ours needs CAP_SYS_RESOURCE: without it ours stays, and
    the exec is the likelier OOM victim, never the less likely one."""
    try:
        fd = os.open(f"/proc/{init_pid}/oom_score_adj", os.O_RDONLY | os.O_CLOEXEC)
        try:
            value = int(os.read(fd, 32))
        finally:
            os.close(fd)
        signal.pidfd_send_signal(pidfd, 0)
        _write("/proc/self/oom_score_adj", str(value).encode())
    except (OSError, ValueError):
        pass


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
