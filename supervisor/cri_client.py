"""The supervisor, as ``warmexec cri`` asks it: one ZeroMQ DEALER on the proxy's own loop.

The CRI server is one asyncio loop (grpc.aio). Asking the supervisor from that loop
costs no thread hop and no socket per thread: a request is a non-blocking send on one
DEALER, and its reply, read when the socket's descriptor turns readable, completes the
future its call awaits (by request id). That is the ExecSync fast path: a protobuf
decode, one msgpack frame each way, a protobuf encode. pyzmq's own asyncio sockets
would do the same with a future, a callback and a poll per message, which measured
about as much CPU as the rest of the proxy's ExecSync work.

The same rules as :class:`warmexec.protocol.Client`: a request over the supervisor's
frame limit is never sent; a call never waits forever: while replies are outstanding
and nothing has come from the supervisor for LIVENESS seconds, it is pinged, and if
nothing comes for LIVENESS more every call waiting is ``UNREACHABLE``; a call with a
deadline (an exec's timeout plus REPLY_MARGIN, a list's 0.5 s) is ``TIMEOUT`` past it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq

from ..protocol import codec, errors
from ..protocol.client import LIVENESS, MAX_REPLY, REPLY_MARGIN, too_large
from ..protocol.errors import WarmexecError
from ..protocol.messages import VERSION

log = logging.getLogger("warmexec")


class Supervisor:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context.instance()  # the process's one context, as Client's: never collected
        self.sock: zmq.Socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.heard = 0.0  # loop time of the last message from the supervisor
        self.watchdog: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
            self.sock.close(linger=0)
            self.sock = None

    async def call(self, op: str, wait: float | None, **fields: Any) -> dict:
        """The reply's map; WarmexecError for an error reply, no reply within wait seconds
        (None: for as long as the supervisor answers pings) or no supervisor."""
        fut = self._send(op, fields)
        deadline = None if wait is None else self.loop.call_later(wait, _fail, fut, errors.TIMEOUT,
                                                                  f"no reply within {wait}s")
        try:
            reply = await fut
        finally:
            self.waiting.pop(fut.rid, None)
            if deadline is not None:
                deadline.cancel()
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise WarmexecError(err.get("code", errors.INTERNAL), err.get("message", ""))
        return reply

    async def exec(self, container: str, argv: list[str], timeout: int | None, capture: int) -> dict:
        """As Client.exec: with a timeout, waits that plus a margin for the supervisor's answer."""
        return await self.call("exec", None if timeout is None else timeout + REPLY_MARGIN,
                               container=container, argv=argv, timeout=timeout, capture=capture)

    # ---- the socket ------------------------------------------------------------------
    def _send(self, op: str, fields: dict) -> asyncio.Future:
        if self.sock is None:
            self._connect()
        rid = next(self.ids)
        msg = {"v": VERSION, "id": rid, "op": op}
        msg.update((k, v) for k, v in fields.items() if v is not None)
        data = codec.pack(msg)
        if len(data) > codec.MAX_MESSAGE:
            raise WarmexecError(errors.BAD_REQUEST, too_large(len(data)))
        try:
            self.sock.send(data, zmq.NOBLOCK)  # queued by ZeroMQ: never waits on the supervisor
        except zmq.Again:
            raise WarmexecError(errors.UNREACHABLE, "cannot reach the supervisor") from None
        fut = self.loop.create_future()
        fut.rid = rid
        if not self.waiting:
            self.heard = self.loop.time()  # quiet time counts from the first call waiting
        if self.watchdog is None:
            self._arm()
        self.waiting[rid] = fut
        self.loop.call_soon(self._readable)  # a send can take the descriptor's edge: look now
        return fut

    def _connect(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self._readable)

    def _readable(self) -> None:
        """Every message there is (ZeroMQ's descriptor signals edges, not levels)."""
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            data = sock.recv(zmq.NOBLOCK)
            self.heard = self.loop.time()
            try:
                msg = codec.unpack_map(data, MAX_REPLY)
            except codec.ProtocolError as exc:
                log.warning("undecodable reply from the supervisor: %s", exc)
                continue
            fut = self.waiting.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    # ---- liveness --------------------------------------------------------------------
    def _arm(self) -> None:
        self.watchdog = self.loop.call_at(self.heard + LIVENESS, self._check)

    def _check(self) -> None:
        """While calls wait: ping after LIVENESS of silence, give up after twice that."""
        self.watchdog = None
        pending = [f for f in self.waiting.values() if not f.done()]
        if not pending:
            return
        quiet = self.loop.time() - self.heard
        if quiet >= 2 * LIVENESS:
            for fut in pending:
                _fail(fut, errors.UNREACHABLE, "the supervisor is not answering")
            return
        if quiet >= LIVENESS:  # its answer, the pong, counts as hearing from it
            ping = self._send("ping", {})
            ping.add_done_callback(self._pinged)
            self.watchdog = self.loop.call_at(self.heard + 2 * LIVENESS, self._check)
        else:
            self._arm()


    def _pinged(self, ping: asyncio.Future) -> None:
        self.waiting.pop(ping.rid, None)
        if not ping.cancelled():
            ping.exception()  # retrieved: an unanswered ping is the calls' error, not its own


def _fail(fut: asyncio.Future, code: str, message: str) -> None:
    if not fut.done():
        fut.set_exception(WarmexecError(code, message))
