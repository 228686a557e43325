"""What the supervisor holds of a served container and of each of its workers.

``Served`` is a container being served: what discovery found, a pidfd on its init,
its freezer and OOM counters, and its workers, one per credential profile. ``Worker``
is the handle on one (container, profile) worker: its process (a pidfd), its socket and
non-blocking ``Outbox``, its lifecycle (lifecycle.py) and the execs waiting for it or
in flight in it. The container's own worker (``DEFAULT``) keeps its handle across
restarts; a worker of another profile has one handle for its one life.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections import deque
from typing import Any

from ..protocol import ipc
from .discovery import Container
from .execs import Exec
from .lifecycle import Emit, Lifecycle, State
from .loop import Timer
from .pidfds import pid_ns, stat_fields

#: The profile (user, privileged) of execs that name no user and are not privileged: the
#: container's own.
DEFAULT = ("", False)
Profile = tuple[str, bool]
PF_EXITING = 0x4  # /proc/PID/stat flags: the process is exiting


class Worker:
    """The worker lives inside its container, which can stop, trace or flood it: every
    message to it goes through a non-blocking outbox bounded in bytes, and the handle
    keeps a pidfd (the joiner's, then the worker's) to kill it when it is late."""

    def __init__(self, name: str, profile: Profile, emit: Emit) -> None:
        self.profile = profile
        labels = {} if profile == DEFAULT else {"user": profile[0], "privileged": profile[1]}
        self.life = Lifecycle(name, emit, **labels)
        self.sock: socket.socket | None = None
        self.pid: int | None = None  # host pid: the joiner's, then the worker's
        self.pidfd = -1
        self.outbox: Outbox | None = None
        self.fork_tag = 0  # of the zygote's fork being waited for
        self.fork_at = 0.0  # when it was asked for
        self.timers: list[Timer] = []  # its start deadline or restart, cancelled when moot
        self.waiting: list[Exec] = []  # until it is READY
        self.inflight: dict[int, Exec] = {}  # exec id -> exec sent to it
        self.last_used = time.monotonic()
        self.error = ""  # why it failed to set up, if its joiner said
        self.error_code = ""
        self.exit_seq = 0  # the last exit it reported (its zombie waits for our ack)
        self.acked = 0
        self.ack_pending = False

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def ready(self) -> bool:
        return self.life.state == State.READY

    def attach(self, sock: socket.socket, pid: int, pidfd: int) -> None:
        """A new process behind the handle: the joiner the zygote forked."""
        self.sock, self.outbox = sock, Outbox(sock)
        self.set_process(pid, pidfd)
        self.error = self.error_code = ""
        self.exit_seq = self.acked = 0
        self.ack_pending = False

    def set_process(self, pid: int, pidfd: int) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pid, self.pidfd = pid, pidfd

    def send(self, msg: dict, fds: list[int] = ()) -> bool:
        """Queue msg for the worker without blocking (taking ownership of fds); True if
        anything is left waiting for the socket to turn writable. OSError: it is gone."""
        if self.outbox is None:
            for fd in fds:
                os.close(fd)
            raise BrokenPipeError(32, "the worker is gone")
        return self.outbox.send(msg, fds)

    def kill(self) -> None:
        """SIGKILL the process behind the handle (the kernel says no once it is gone)."""
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass

    def state_letter(self) -> str:
        """The process's state in /proc (R, S, D, T, ...), "" if it is gone."""
        fields = stat_fields(self.pid)
        return fields[0].decode() if fields else ""

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    def idle_since(self, since: float) -> bool:
        return not self.inflight and not self.waiting and self.last_used < since

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.set_process(self.pid or 0, -1)


class Outbox:
    """Messages to one worker, sent without ever blocking the loop: what the socket
    cannot take now waits here (with its descriptors) until it turns writable, up to
    MAX_BYTES; past that the worker is not reading and a new exec is refused."""

    MAX_BYTES = 16 << 20

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: deque[tuple[bytes, list[int]]] = deque()
        self.bytes = 0

    def full(self) -> bool:
        return self.bytes >= self.MAX_BYTES

    def send(self, msg: dict, fds: list[int] = ()) -> bool:
        """Queue msg (taking ownership of fds); True if anything is left waiting."""
        data = ipc.encode(msg)
        if not self.queue and ipc.send_nowait(self.sock, data, fds):  # the common case
            for fd in fds:
                os.close(fd)
            return False
        self.queue.append((data, list(fds)))
        self.bytes += len(data)
        return self.flush()

    def flush(self) -> bool:
        """Send what the socket takes; True if anything is left (wait for EPOLLOUT)."""
        while self.queue:
            data, fds = self.queue[0]
            if not ipc.send_nowait(self.sock, data, fds):
                return True
            self.queue.popleft()
            self.bytes -= len(data)
            for fd in fds:
                os.close(fd)
        return False

    def close(self) -> None:
        for _, fds in self.queue:
            for fd in fds:
                os.close(fd)
        self.queue.clear()
        self.bytes = 0


class Served:
    """A container being served, from discovery (or attach) until it goes."""

    def __init__(self, info: Container, init_pidfd: int, emit: Emit) -> None:
        self.info = info
        self.init_pidfd = init_pidfd
        self.own = Worker(info.id, DEFAULT, emit)  # its own worker, restarted when it dies
        self.workers: dict[Profile, Worker] = {DEFAULT: self.own}  # the others come and go
        self.restarts = 0
        self.hopeless = False  # its own worker lacked privileges: FATAL at once
        self.oom_seen = oom_kills(info)
        self.freezer_fds = _freezer_fds(info)
        self.pid_ns = pid_ns(info.init_pid)  # where its commands must be

    @property
    def name(self) -> str:
        return self.info.id

    @property
    def state(self) -> State:
        """Its own worker's state: what `warmexec ls` and the metrics show."""
        return self.own.state

    def dying(self) -> bool:
        """True once the container's init has exited or is exiting.

        A pid namespace's init is killed first but its pidfd turns readable only after
        every other process in the namespace (our commands among them) has been reaped:
        so a worker's death, or its command's, is seen first, and init's PF_EXITING flag
        tells the two apart.
        """
        p = select.poll()
        p.register(self.init_pidfd, select.POLLIN)
        if p.poll(0):
            return True
        fields = stat_fields(self.info.init_pid)
        return len(fields) < 7 or fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)

    def paused(self) -> bool:
        """Frozen by `runc pause` (v1 freezer.state or v2 cgroup.events)? An exec would
        hang until thawed, so it is refused as runc refuses it."""
        for fd in self.freezer_fds:
            state = os.pread(fd, 256, 0)
            if state.startswith((b"FROZEN", b"FREEZING")) or b"frozen 1" in state:
                return True
        return False

    def open_execs(self) -> int:
        """Execs received for it and not yet answered."""
        return sum(len(w.waiting) + len(w.inflight) for w in self.workers.values())

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        if self.init_pidfd >= 0:
            os.close(self.init_pidfd)
            self.init_pidfd = -1
        for fd in self.freezer_fds:
            os.close(fd)
        self.freezer_fds = []

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "pid": self.info.init_pid, "source": self.info.source,
                "state": self.state.name, "worker_pid": self.own.pid if self.own.sock else None,
                "workers": sum(1 for w in self.workers.values()
                               if w.state in (State.STARTING, State.JOINING, State.READY)),
                "inflight": self.open_execs(), "restarts": self.restarts,
                "last_error": self.own.life.last_error or None}


def _freezer_fds(info: Container) -> list[int]:
    fds = []
    for procs in info.cgroup_procs:
        for name in ("freezer.state", "cgroup.events"):
            try:
                fds.append(os.open(os.path.join(os.path.dirname(procs), name), os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                continue
    return fds


def oom_kills(info: Container) -> int:
    """The container's memory cgroup OOM-kill counter (v2 memory.events, v1 oom_control)."""
    for procs in info.cgroup_procs:
        d = os.path.dirname(procs)
        for name in ("memory.events", "memory.oom_control"):
            try:
                with open(os.path.join(d, name)) as f:
                    for line in f:
                        if line.startswith("oom_kill "):
                            return int(line.split()[1])
            except OSError:
                continue
    return 0
