"""Descriptors a worker sends: which to keep, and letting go of the rest safely.

A worker is a process of its container, which may have taken it over: whatever it
passes with SCM_RIGHTS lands in the supervisor's fd table. Only pidfds are ever
wanted, and only of the right processes, read from the kernel (fdinfo), never from the
message. Anything else is let go of without blocking the loop: a socket's last close
can wait for its peer (SO_LINGER) and a file's for its filesystem (FUSE), for as long
as the container likes; so sockets are reset and everything else is closed on a
thread of its own.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import stat
import struct
import threading

log = logging.getLogger("warmexec")


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def is_pidfd(fd: int) -> bool:
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return link == "anon_inode:[pidfd]" or link.startswith("pidfd:")


def fdinfo_pids(pidfd: int) -> tuple[int, int] | None:
    """(pid in our namespace, pid in its own) from a pidfd's fdinfo; None if the fd is
    no pidfd (no other kind of descriptor has those lines)."""
    try:
        fd = os.open(f"/proc/self/fdinfo/{pidfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    at, ns_at = data.find(b"\nPid:"), data.find(b"\nNSpid:")
    if at < 0 or ns_at < 0:
        return None
    try:
        pid = int(data[at + 5:data.index(b"\n", at + 1)])
        return pid, int(data[ns_at + 7:data.index(b"\n", ns_at + 1)].split()[-1])
    except (ValueError, IndexError):
        return None


def command_pids(pidfd: int, ns: str | None, pids: tuple[int, int] | None) -> tuple[int, int] | None:
    """(host pid, container pid) of the process behind a pidfd a worker sent (pids: its
    fdinfo_pids, read once); None unless it is a process (alive, or a zombie) of the
    container's pid namespace (a worker taken over by its container could send any
    pidfd it holds)."""
    try:
        if pids is None or pids[0] <= 0 or ns is None or pid_ns(pids[0]) != ns:
            return None
        signal.pidfd_send_signal(pidfd, 0)  # still that process: its pid not reused since
        return pids
    except OSError:
        return None


def worker_pidfd(fds: list[int], joiner: int, zygote: int, ns: str | None) -> tuple[int, int] | None:
    """(host pid, pidfd) of the worker a joiner reported ready: the pidfd it sent, or,
    where seccomp denied it one, the joiner's only child, opened by us; either way a
    child of the joiner (or of the zygote, once the joiner has exited) in the
    container's pid namespace. None: not so (the worker itself could have raced its
    joiner's message with one of its own)."""
    try:
        if fds:
            pidfd = os.dup(fds[0])
        else:
            with open(f"/proc/{joiner}/task/{joiner}/children") as f:
                children = f.read().split()
            if len(children) != 1:
                return None
            pidfd = os.pidfd_open(int(children[0]))
    except (OSError, ValueError):
        return None
    pids = fdinfo_pids(pidfd)
    if pids is not None and pid_ns(pids[0]) == ns and _parent(pids[0]) in (joiner, zygote):
        return pids[0], pidfd
    os.close(pidfd)
    return None


def children(parent: int | None, ns: str | None) -> list[tuple[int, int, int]]:
    """(pidfd, host pid, container pid) of each child of parent (a worker, by its host
    pid) in the pid namespace ns, opened by us: for commands whose pidfd we were never
    sent. A child is taken only if, with its pidfd open, it is still parent's child."""
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []
    found = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        ids = fdinfo_pids(pidfd)
        if ids is not None and _parent(pid) == parent and pid_ns(pid) == ns:
            found.append((pidfd, *ids))
        else:
            os.close(pidfd)
    return found


def stat_fields(pid: int | None) -> list[bytes]:
    """/proc/PID/stat's fields after the command name (state first, then ppid, pgrp,
    ...; field 3 of proc(5) is index 0); [] if the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:  # plain fd I/O: a file object costs five system calls more
        return os.read(fd, 4096).rsplit(b") ", 1)[1].split()
    except (OSError, IndexError):
        return []
    finally:
        os.close(fd)


def _parent(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else None


_LINGER_RESET = struct.pack("ii", 1, 0)
_closer: queue.SimpleQueue[int] = queue.SimpleQueue()
_closer_started = threading.Event()


def dispose(fds: list[int]) -> None:
    """Let go of descriptors a worker sent, never blocking the calling thread."""
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISSOCK(mode):  # reset, so that its close waits for no peer
            if not _reset(fd):
                _close_later(fd)
        elif is_pidfd(fd) or stat.S_ISFIFO(mode):  # their last close never waits
            os.close(fd)
        else:
            _close_later(fd)


def _reset(fd: int) -> bool:
    """SO_LINGER {on, 0} then close: an immediate reset. False if it could not be set."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        sock.detach()
        return False
    sock.close()
    return True


def _close_later(fd: int) -> None:
    if not _closer_started.is_set():
        _closer_started.set()
        threading.Thread(target=_closing, name="warmexec-fd-closer", daemon=True).start()
    _closer.put(fd)


def _closing() -> None:
    while True:
        fd = _closer.get()
        try:
            os.close(fd)
        except OSError:
            pass
