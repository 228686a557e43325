"""The supervisor's event loop: one epoll set and a timer heap, one thread.

Everything the supervisor waits on is an fd in the epoll set: the ROUTER socket
(through ZMQ_FD, which is edge-triggered), the zygote's socket, each worker's
socketpair, stdin pipes, each container init's pidfd, inotify and the event socket.
Timers (exec deadlines, worker backoff, discovery rescans) live in the heap. No handler
blocks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("warmexec")


class Timer:
    """A pending ``Loop.call_at``. ``cancel()`` drops the callback at once, and with it
    everything the callback holds (an exec's request, stdin and output): a timer that
    only waited for its deadline kept a finished exec alive until then."""

    __slots__ = ("fn", "_loop")

    def __init__(self, loop: Loop, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn
        self._loop = loop

    def cancel(self) -> None:
        """Idempotent; a no-op once the timer has fired."""
        if self.fn is not None:
            self.fn = None
            self._loop._cancelled_one()


class Loop:
    """epoll + a timer heap. Handlers are called with the epoll event mask.

    A cancelled timer leaves an empty entry in the heap (removing it from the middle of
    a heap is O(n)): when such entries are most of the heap, it is rebuilt without
    them, so the heap stays within twice the live timers (plus COMPACT_MIN)."""

    COMPACT_MIN = 256

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # entries of self.timers whose Timer was cancelled
        self._seq = itertools.count()
        self.running = True

    def add(self, fd: int, handler: Callable[[int], None], mask: int = select.EPOLLIN) -> None:
        self.handlers[fd] = handler
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def call_at(self, when: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(self, fn)
        heapq.heappush(self.timers, (when, next(self._seq), timer))
        return timer

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > self.COMPACT_MIN and 2 * self._cancelled > len(self.timers):
            self.timers = [entry for entry in self.timers if entry[2].fn is not None]
            heapq.heapify(self.timers)
            self._cancelled = 0

    def _next_due(self) -> float | None:
        """The deadline of the first live timer (cancelled ones at the top are dropped)."""
        timers = self.timers
        while timers and timers[0][2].fn is None:
            heapq.heappop(timers)
            self._cancelled -= 1
        return timers[0][0] if timers else None

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        due = self._next_due()
        while due is not None and due <= now:
            timer = heapq.heappop(self.timers)[2]
            fn, timer.fn = timer.fn, None  # fired: a later cancel() is a no-op
            self._call(fn)
            due = self._next_due()
        wait = max_wait if due is None else min(max_wait, max(0.0, due - now))
        try:
            events = self.epoll.poll(wait)
        except InterruptedError:
            return
        for fd, mask in events:
            handler = self.handlers.get(fd)
            if handler is not None:
                self._call(handler, mask)

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """One handler's bug must not take the supervisor (and every client) down."""
        try:
            fn(*args)
        except Exception:
            log.exception("internal error in %r", fn)
