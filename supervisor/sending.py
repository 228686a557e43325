"""Everything the supervisor sends to clients: replies and a streamed exec's events.

A reply up to SMALL_REPLY is copied into ZeroMQ, bounded by SNDHWM alone; a larger one
goes zero-copy and tracked, within its client's byte budget (replies.py's ReplyBudget),
which a stream's output events share. A reply whose envelope starts with LOOPBACK goes
back on the loopback socket (the metrics thread's probes), any other on the ROUTER.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from ..protocol import codec
from .loop import Loop, Timer
from .replies import DROPPED, FLUSH_INTERVAL, SENT, SWEEP_INTERVAL, ReplyBudget

log = logging.getLogger("warmexec")

REPLY_DROPPED = "REPLY_DROPPED"  # a metrics label, never a reply
SMALL_REPLY = 4 << 10  # bytes: a reply up to this is copied into zmq, bounded by SNDHWM alone
# Plain ints: each use of pyzmq's flag enums builds an Enum object, on every message.
NOBLOCK = int(zmq.NOBLOCK)
MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class _Loopback(bytes):
    """The type of LOOPBACK: no frame received from a socket is ever this object."""


#: First in the envelope of a request from the loopback socket: its reply goes back there.
LOOPBACK = _Loopback(b"")


class Sender:
    def __init__(self, loop: Loop, router: zmq.Socket, loopback: zmq.Socket,
                 count_error: Callable[[str], None]) -> None:
        self.loop = loop
        self.router, self.loopback = router, loopback
        self.count_error = count_error
        self.budget = ReplyBudget(self._send_tracked)
        self._flush: tuple[float, Timer] | None = None  # the next flush of self.budget
        self.loopback_used = False  # set on each send there: its ZMQ_FD must be asked again

    def reply(self, envelope: list[bytes], msg: dict) -> None:
        data = codec.pack(msg)
        if len(data) > SMALL_REPLY:
            outcome = self.budget.offer(envelope, data)
            if outcome == DROPPED:
                self.count_error(REPLY_DROPPED)
            return self._flush_within(SWEEP_INTERVAL if outcome == SENT else FLUSH_INTERVAL)
        sock, envelope = self._route(envelope)
        send = sock.send
        try:
            for frame in envelope:  # the first one (the client's identity) routes it all
                send(frame, MORE)
            send(data, NOBLOCK)
        except zmq.Again:
            self.count_error(REPLY_DROPPED)
        except zmq.ZMQError as exc:  # client gone, unroutable
            log.debug("reply dropped: %s", exc)

    def event(self, envelope: list[bytes], msg: dict) -> bool:
        """One message of a streamed exec: False if it cannot go now (ZeroMQ's queue for
        that client is full, or the client's byte budget: the stream holds it and stops
        reading its pipes); a client that is gone is sent nothing."""
        data = codec.pack(msg)
        large = len(data) > SMALL_REPLY
        size = self.budget.room_for(envelope, data) if large else 0
        if large and not size:
            return False
        send = self.router.send
        try:
            for frame in envelope:
                send(frame, MORE)
            if not large:
                send(data, NOBLOCK)
                return True
            tracker = send(zmq.Frame(data, track=True, copy=False), NOBLOCK, copy=False, track=True)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.debug("stream message dropped: %s", exc)
            return True
        self.budget.held(envelope, size, tracker)
        self._flush_within(SWEEP_INTERVAL)
        return True

    def _route(self, envelope: list[bytes]) -> tuple[zmq.Socket, list[bytes]]:
        """The socket a reply goes out on, and the envelope that routes it there."""
        if envelope and envelope[0] is LOOPBACK:
            self.loopback_used = True
            return self.loopback, envelope[1:]
        return self.router, envelope

    def _send_tracked(self, envelope: list[bytes], data: bytes) -> zmq.MessageTracker | None:
        sock, envelope = self._route(envelope)
        send = sock.send
        try:
            for frame in envelope:
                send(frame, MORE)
            return send(zmq.Frame(data, track=True, copy=False), NOBLOCK, copy=False, track=True)
        except zmq.Again:
            self.count_error(REPLY_DROPPED)
        except zmq.ZMQError as exc:
            log.debug("reply dropped: %s", exc)
        return None

    def _flush_within(self, interval: float) -> None:
        """One flush timer, at most interval from now (a later one is replaced)."""
        when = time.monotonic() + interval
        if self._flush is not None:
            if self._flush[0] <= when:
                return
            self._flush[1].cancel()
        self._flush = (when, self.loop.call_at(when, self._on_flush))

    def _on_flush(self) -> None:
        self._flush = None
        interval = self.budget.flush()
        if interval is not None:
            self._flush_within(interval)
