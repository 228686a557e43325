"""A worker's life as an explicit state machine (every worker, whatever its profile).

Every change goes through ``Lifecycle.transition``, which checks the edge against
``TRANSITIONS``, stamps the time and emits one ``worker.state`` event. The container's
own worker (the DEFAULT profile) is restarted after BACKOFF, which spaces out restarts
of a worker that keeps dying; FATAL stops a container whose namespaces cannot be joined
from respawning in a hot loop. A worker of another profile is not restarted: once lost
it is EXITED, and the next exec with its profile forks a new one.

::

    STARTING -> JOINING -> READY
       |           |         |
       +-----------+---------+--> BACKOFF -> STARTING (restart) | FATAL
       +-----------+---------+--> EXITED (container gone, worker let go)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum


class State(IntEnum):
    STARTING = 10  # fork asked of the zygote
    JOINING = 20  # forked, joining the container
    READY = 30
    BACKOFF = 40  # died while the container lives; restart pending
    EXITED = 50  # the container is gone, or the worker was let go
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


Emit = Callable[..., None]  # one internal event: emit(topic, **fields)


class IllegalTransition(RuntimeError):
    pass


class Lifecycle:
    def __init__(self, name: str, emit: Emit, clock: Callable[[], float] = time.monotonic,
                 **labels: object) -> None:
        self.name = name  # the container's
        self.labels = labels  # added to each event (the worker's profile)
        self.emit = emit
        self.clock = clock
        self.state = State.STARTING
        self.since = clock()
        self.failures = 0  # in the current run of failures
        self.last_error = ""
        self.retry_at = 0.0

    def transition(self, new: State, reason: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.name}: illegal transition {self.state.name} -> {new.name}")
        now = self.clock()
        if new == State.BACKOFF and self.state == State.READY and now - self.since >= STABLE_AFTER:
            self.failures = 0  # it had served a while: this is a new run of failures
        old, self.state, self.since = self.state, new, now
        if new == State.BACKOFF:
            self.failures += 1
            self.last_error = reason or self.last_error
            self.retry_at = now + min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (self.failures - 1))
        self.emit("worker.state", container=self.name, old=old.name, new=new.name, reason=reason,
                  **self.labels)

    def out_of_retries(self) -> bool:
        return self.failures >= MAX_FAILURES
