"""Per-container runtime state: its worker's lifecycle, and its workers of other profiles.

The worker's life is an explicit state machine. Every change goes through
``_transition`` which checks the edge against ``TRANSITIONS``, stamps the time and
emits one event. BACKOFF spaces out restarts of a worker that keeps dying; FATAL stops
a container whose namespaces cannot be joined from respawning in a hot loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from .discovery import Container
from .execs import Exec


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


#: The profile of execs that name no user and are not privileged: the container's own.
DEFAULT = ("", False)


class Worker:
    """The supervisor's handle on one worker process: one credential profile (user,
    privileged) in one container. The DEFAULT profile's worker is the container's
    worker of the state machine below; other profiles' come and go on demand."""

    def __init__(self, key: tuple[str, bool]) -> None:
        self.key = key
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.waiting: list[Exec] = []  # until the worker is ready
        self.inflight: dict[int, Exec] = {}
        self.last_used = time.monotonic()
        self.ready = False
        self.error = ""  # why it failed to set up, if it said
        self.error_code = ""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


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

    @property
    def name(self) -> str:
        return self.info.id

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.name}: illegal transition {self.state.name} -> {new.name}")
        old, self.state, self.since = self.state, new, time.monotonic()
        if new == State.READY:
            self.failures = 0
        elif new == State.BACKOFF:
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
