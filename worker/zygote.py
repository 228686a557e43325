"""The zygote: a fresh, single-threaded interpreter that forks every worker.

The supervisor runs ZeroMQ, whose I/O threads would make any process forked from it
multithreaded, and the kernel refuses setns into a mount or user namespace from a
multithreaded process. So the supervisor execs this module once, at start-up, with
one end of a socketpair (its fd number on the command line), and asks it for workers::

    supervisor -> {op: fork, tag, seccomp}
    zygote     -> {op: forked, tag, pid} + fds [worker socket, pidfd of the joiner]

The container's spec, user and privileged flag go from the supervisor to the joiner
alone, over that socket: the zygote never holds a container's spec (its environment
may carry secrets), so a worker, whose memory is a copy of the zygote's, holds none
of another container's. Only seccomp profiles pass here, each compiled once.

A worker serves one (container, credential profile): the container's default user,
or a request's user and privileged flag. What the zygote forks is the worker's joiner
(:mod:`join`), which joins the container and forks the worker itself.

It imports only what a worker needs, then freezes the heap (gc.freeze) so that forked
workers share its pages instead of copying them on the first garbage collection. The
standard library (and msgpack) comes first, some of it imported here for that alone:
warmexec's own objects, which every worker touches (and so copies page by page), are
then allocated together rather than scattered among the standard library's.

It runs from a sealed in-memory copy of the interpreter (:func:`run_sealed`), so no
process forked from it executes a file of the host. It is the subreaper of what it
forks: a worker whose joiner has exited is its child, and it reaps it.
"""

from __future__ import annotations

import _signal
import array  # noqa: F401 (imported early: see above)
import ctypes  # noqa: F401
import dataclasses  # noqa: F401
import errno
import fcntl
import gc
import json
import mmap  # noqa: F401
import os
import platform  # noqa: F401
import resource  # noqa: F401
import select
import signal
import socket
import stat  # noqa: F401
import sys
import termios  # noqa: F401 (a terminal's ioctls, worker/terminal.py: no import after setns)
import time  # noqa: F401

import msgpack  # noqa: F401

from ..protocol import codec, internal, ipc
from . import linux, seccomp
from .join import joiner_main


def main(supervisor_pid: int, fd: int) -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    sock = socket.socket(fileno=fd)
    if os.getppid() != supervisor_pid:  # it died before the death signal was set
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Reap workers as they exit, and the commands of those that died (see above).
    signal.signal(signal.SIGCHLD, lambda *_: None)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    poll.register(wake_r, select.POLLIN)
    gc.collect()
    try:
        fill_pools()
    except Exception:  # noqa: BLE001 - a memory layout nicety: never a reason not to start
        pass
    gc.freeze()
    me = os.getpid()
    while True:
        try:
            events = poll.poll()
        except InterruptedError:
            continue
        for ready, _ in events:
            if ready == wake_r:
                os.read(wake_r, 4096)
                reap()
                continue
            msg, fds = ipc.recv(sock)
            if msg is None:
                return
            for extra in fds:
                os.close(extra)
            if msg.get("op") == internal.FORK:
                fork_joiner(sock, msg, me, (wake_r, wake_w))


_FILLER: list = []


def _free_blocks() -> dict[int, int]:
    """pymalloc's free blocks in partly used pools, by size class (its own report)."""
    out = os.memfd_create("mallocstats")
    saved = os.dup(2)
    os.dup2(out, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    text = os.pread(out, 1 << 20, 0).decode()
    os.close(out)
    blocks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].isdigit():
            blocks[int(parts[0])] = int(parts[4])
    return blocks


def fill_pools() -> None:
    """Take every free block of pymalloc's partly used pools, for good: a worker then
    allocates from pools of its own instead of copying a page of ours per block."""
    for size_class, n in _free_blocks().items():
        if size_class == 0:
            _FILLER.append([object() for _ in range(n)])
        elif size_class == 1:
            _FILLER.append([1 << 20 | i for i in range(n)])  # a one-digit int: 28 bytes
        else:
            _FILLER.append([bytes((size_class + 1) * 16 - 33) for _ in range(n)])


_FILTERS: dict[str, dict] = {}  # seccomp profile (as JSON) -> what the worker loads
MAX_FILTERS = 64


def compiled_filter(profile: dict) -> dict:
    """The profile compiled to BPF by a throwaway child (its heap, not ours: pages we
    write stop being shared with every worker), once per distinct profile."""
    key = json.dumps(profile, sort_keys=True)
    if key not in _FILTERS:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                data = codec.pack(seccomp.precompiled(profile))
                while data:
                    data = data[os.write(w, data):]
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        try:
            result = codec.unpack_map(b"".join(chunks))
        except codec.ProtocolError:
            result = {"error": "seccomp profile: the compiler died", "errno": errno.EINVAL}
        if len(_FILTERS) >= MAX_FILTERS:
            _FILTERS.clear()
        _FILTERS[key] = result
    return _FILTERS[key]


def fork_joiner(sock: socket.socket, msg: dict, me: int, own_fds: tuple[int, int]) -> int:
    """Fork the joiner of a worker for msg (see :mod:`join`); its pid, 0 if fork failed.
    The supervisor gets the joiner's socket and a pidfd on it, to kill it if it is late."""
    seccomp = compiled_filter(msg["seccomp"]) if msg.get("seccomp") else None
    ours, theirs = ipc.socketpair()
    try:
        pid = os.fork()
    except OSError as exc:
        ours.close()
        theirs.close()
        ipc.send(sock, internal.forked(msg["tag"], 0, str(exc)))
        return 0
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            # _signal, not signal: signal.signal would turn the old handler (our lambda)
            # into an enum, a failing lookup that touches memory every worker then copies.
            _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
            for fd in own_fds:
                os.close(fd)
            sock.close()
            ours.close()
            joiner_main(theirs, seccomp, me)
            code = 0
        except (BrokenPipeError, ConnectionResetError):
            code = 0  # the supervisor let go of this worker
        except BaseException as exc:  # noqa: BLE001 - the child never returns
            os.write(2, f"warmexec joiner: {exc!r}\n".encode())
        finally:
            os._exit(code)
    theirs.close()
    pidfd = os.pidfd_open(pid)
    ipc.send(sock, internal.forked(msg["tag"], pid), [ours.fileno(), pidfd])
    ours.close()
    os.close(pidfd)
    return pid


def reap() -> None:
    """Reap every child that exited: joiners, and the workers they leave us (we are
    their subreaper once their joiner has exited)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run_sealed() -> None:
    """Re-execute this interpreter from a sealed in-memory copy of itself, unless it
    already runs from one (runc's cloned binary, against CVE-2019-5736).

    Every worker is forked from the zygote, so its /proc/self/exe is this copy: a
    container whose image makes a command's interpreter ``/proc/self/exe`` runs the
    copy (with the container's own libraries, as its own process), and a container
    process that opens it holds a file that cannot be written, truncated or grown,
    never the host's interpreter."""
    try:
        exe = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        sealed = fcntl.fcntl(exe, fcntl.F_GET_SEALS) & SEALS == SEALS
    except OSError:
        sealed = False  # not a memfd
    if sealed:
        os.close(exe)
        return
    copy = os.memfd_create("warmexec-python", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    while os.sendfile(copy, exe, None, 1 << 24):
        pass
    os.close(exe)
    fcntl.fcntl(copy, fcntl.F_ADD_SEALS, SEALS)
    os.execve(copy, sys.orig_argv, os.environ)  # fexecve: argv[0] still finds the venv


SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


if __name__ == "__main__":
    run_sealed()
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
