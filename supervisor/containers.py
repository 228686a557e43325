"""Per-container runtime state: its worker's lifecycle, and its workers of other profiles.

The worker's life is an explicit state machine. Every change goes through
``_transition`` which checks the edge against ``TRANSITIONS``, stamps the time and
emits one event. BACKOFF spaces out restarts of a worker that keeps dying; FATAL stops
a container whose namespaces cannot be joined from respawning in a hot loop.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from ..protocol import ipc
from .discovery import Container
from .execs import Exec
from .pidfds import pid_ns, stat_fields


class State(IntEnum):
    STARTING = 10  # fork asked of the zygote
    JOINING = 20  # forked, joining the container
    READY = 30
    BACKOFF = 40  # died while the container lives; restart pending
    EXITED = 50  # the container is gone
    FATAL = 60  # failed too often; no more restarts


TRANSITIONS = {
    State.STARTING: {State.JOINING, State.BACKOFF, State.EXITED},
    State.JOINING: {State.READY, State.BACKOFF, State.EXITED},
    State.READY: {State.BACKOFF, State.EXITED},
    State.BACKOFF: {State.STARTING, State.FATAL, State.EXITED},
    State.FATAL: {State.EXITED},
    State.EXITED: set(),
}

MAX_FAILURES = 5
BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0
#: A worker that dies sooner than this after READY continues its run of failures (so
#: a container that kills its worker as soon as it serves cannot make it restart in a
#: hot loop); one that served longer starts a new run.
STABLE_AFTER = 10.0


#: The profile of execs that name no user and are not privileged: the container's own.
DEFAULT = ("", False)


class Worker:
    """The supervisor's handle on one worker process: one credential profile (user,
    privileged) in one container. The DEFAULT profile's worker is the container's
    worker of the state machine below; other profiles' come and go on demand.

    The worker lives inside its container, which can stop, trace or flood it: every
    message to it goes through a non-blocking outbox bounded in bytes, and the handle
    keeps a pidfd (the joiner's, then the worker's) to kill it when it is late."""

    def __init__(self, key: tuple[str, bool]) -> None:
        self.key = key
        self.sock: socket.socket | None = None
        self.pid: int | None = None  # host pid: the joiner's, then the worker's
        self.pidfd = -1
        self.outbox: Outbox | None = None
        self.waiting: list[Exec] = []  # until the worker is ready
        self.inflight: dict[int, Exec] = {}
        self.last_used = time.monotonic()
        self.ready = False
        self.error = ""  # why it failed to set up, if it said
        self.error_code = ""
        self.exit_seq = 0  # the last exit it reported (its zombie waits for our ack)
        self.acked = 0
        self.ack_pending = False

    def attach(self, sock: socket.socket, pid: int, pidfd: int) -> None:
        self.sock, self.outbox = sock, Outbox(sock)
        self.set_process(pid, pidfd)

    def set_process(self, pid: int, pidfd: int) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
        self.pid, self.pidfd = pid, pidfd

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


class Runtime:
    def __init__(self, info: Container, init_pidfd: int, emit: Callable[..., None]) -> None:
        self.info = info
        self.init_pidfd = init_pidfd
        self.emit = emit
        self.state = State.STARTING
        self.since = time.monotonic()
        self.failures = 0
        self.restarts = 0
        self.last_error = ""
        self.hopeless = False  # the worker lacked privileges: FATAL at once
        self.retry_at = 0.0
        self.workers: dict[tuple[str, bool], Worker] = {}
        self.waiting: list[Exec] = []  # until the worker is ready
        self.oom_seen = oom_kills(info)
        self.freezer_fds = _freezer_fds(info)
        self.pid_ns = pid_ns(info.init_pid)  # where its commands must be

    @property
    def name(self) -> str:
        return self.info.id

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.name}: illegal transition {self.state.name} -> {new.name}")
        now = time.monotonic()
        if new == State.BACKOFF and self.state == State.READY and now - self.since >= STABLE_AFTER:
            self.failures = 0  # it had served a while: this is a new run of failures
        old, self.state, self.since = self.state, new, now
        if new == State.BACKOFF:
            self.failures += 1
            self.last_error = reason or self.last_error
            self.retry_at = self.since + min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self.failures - 1))
        self.emit("worker.state", container=self.name, old=old.name, new=new.name, reason=reason)

    def worker_pid(self) -> int | None:
        sp = self.workers.get(DEFAULT)
        return sp.pid if sp is not None else None

    def paused(self) -> bool:
        """Frozen by `runc pause` (v1 freezer.state or v2 cgroup.events)? An exec would
        hang until thawed, so it is refused as runc refuses it."""
        for fd in self.freezer_fds:
            state = os.pread(fd, 256, 0)
            if state.startswith((b"FROZEN", b"FREEZING")) or b"frozen 1" in state:
                return True
        return False

    def inflight(self) -> int:
        return len(self.waiting) + sum(len(s.waiting) + len(s.inflight) for s in self.workers.values())

    def close(self) -> None:
        for sp in self.workers.values():
            sp.close()
        self.workers.clear()
        if self.init_pidfd >= 0:
            os.close(self.init_pidfd)
            self.init_pidfd = -1
        for fd in self.freezer_fds:
            os.close(fd)
        self.freezer_fds = []

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "pid": self.info.init_pid, "source": self.info.source,
                "state": self.state.name, "worker_pid": self.worker_pid(),
                "workers": len(self.workers), "inflight": self.inflight(),
                "restarts": self.restarts, "last_error": self.last_error or None}


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

