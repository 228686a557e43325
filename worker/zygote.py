"""The zygote: a fresh, single-threaded interpreter that forks every worker.

The supervisor runs ZeroMQ, whose I/O threads would make any process forked from it
multithreaded, and the kernel refuses setns into a mount or user namespace from a
multithreaded process. So the supervisor execs this module once, at start-up, with
one end of a socketpair (its fd number on the command line), and asks it for workers::

    supervisor -> {op: fork, tag, spec, user, privileged}
    zygote     -> {op: forked, tag, pid} + fds [worker socket]

A worker serves one (container, credential profile): the container's default user,
or a request's user and privileged flag.

It imports only what a worker needs, then freezes the heap (gc.freeze) so that forked
workers share its pages instead of copying them on the first garbage collection. The
standard library (and msgpack) comes first, some of it imported here for that alone:
warmexec's own objects, which every worker touches (and so copies page by page), are
then allocated together rather than scattered among the standard library's.

It is also its workers' subreaper: when a worker dies, the commands it had started
become the zygote's children (not init's), and the zygote kills the process groups of
those in a container's own pid namespace, whether or not the supervisor had heard of
them yet (a worker reports a quick command's pid only with its exit).
"""

from __future__ import annotations

import _signal
import array  # noqa: F401 (imported early: see above)
import ctypes  # noqa: F401
import dataclasses  # noqa: F401
import errno
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
import time  # noqa: F401

import msgpack  # noqa: F401

from ..protocol import codec, ipc
from . import linux, seccomp
from .worker import worker_main


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
    workers: set[int] = set()
    while True:
        try:
            events = poll.poll()
        except InterruptedError:
            continue
        for ready, _ in events:
            if ready == wake_r:
                os.read(wake_r, 4096)
                reap(workers)
                continue
            msg, fds = ipc.recv(sock)
            if msg is None:
                return
            for extra in fds:
                os.close(extra)
            if msg.get("op") == "fork":
                pid = fork_worker(sock, msg, me, (wake_r, wake_w))
                if pid:
                    workers.add(pid)


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


def fork_worker(sock: socket.socket, msg: dict, me: int, own_fds: tuple[int, int]) -> int:
    """Fork a worker for msg; its pid, 0 if fork failed."""
    process = (msg.get("spec") or {}).get("process") or {}
    if process.get("seccomp"):
        process["seccomp"] = compiled_filter(process["seccomp"])
    ours, theirs = ipc.socketpair()
    try:
        pid = os.fork()
    except OSError as exc:
        ours.close()
        theirs.close()
        ipc.send(sock, {"op": "forked", "tag": msg.get("tag"), "pid": 0, "error": str(exc)})
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
            worker_main(theirs, msg["spec"], msg.get("user"), bool(msg.get("privileged")), me)
            code = 0
        except (BrokenPipeError, ConnectionResetError):
            code = 0  # the supervisor let go of this worker
        except BaseException as exc:  # noqa: BLE001 - the child never returns
            os.write(2, f"warmexec worker {msg['spec'].get('id')}: {exc!r}\n".encode())
        finally:
            os._exit(code)
    theirs.close()
    ipc.send(sock, {"op": "forked", "tag": msg.get("tag"), "pid": pid}, [ours.fileno()])
    ours.close()
    return pid


def reap(workers: set[int]) -> None:
    """Reap every child that exited; if a worker was among them, kill what it left."""
    lost = False
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        if pid in workers:
            workers.discard(pid)
            lost = True
    if lost:
        ours = _pid_ns("self")
        for pid in children() - workers:
            # Only a command that a dead worker started in a container's own pid
            # namespace: the kernel hands a command's own orphans to the container's
            # init, so nothing else of a container's can be here. In a container that
            # shares our pid namespace, what its commands leave behind (daemons) comes
            # to us too: those are left alone, and the supervisor, which is told every
            # such exec's pid at once, kills what a dead worker leaves.
            if _pid_ns(str(pid)) in (ours, None):
                continue
            try:
                os.killpg(pid, signal.SIGKILL)  # each command leads its own session
            except (ProcessLookupError, PermissionError):
                pass  # an unreaped child's group id cannot have been reused


def _pid_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def children() -> set[int]:
    """Our children's pids: the kernel's list, or a scan of /proc without it."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        pass
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        found.add(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
