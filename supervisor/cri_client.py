"""The supervisor, as ``warmexec cri`` asks it: one ZeroMQ DEALER on the proxy's own loop.

The CRI server is one asyncio loop (grpc.aio). Asking the supervisor from that loop,
through one socket whose replies a reader task hands to the calls waiting for them by
request id, costs no thread hop and no socket per thread: the ExecSync fast path is a
protobuf decode, one msgpack frame each way and a protobuf encode. The same rules as
:class:`warmexec.protocol.Client`: a request over the supervisor's frame limit is never
sent, and a call never waits forever: while a reply is outstanding the supervisor is
pinged every LIVENESS seconds, and one that does not answer the ping makes the call
``UNREACHABLE``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from ..protocol import codec, errors
from ..protocol.client import LIVENESS, MAX_REPLY, REPLY_MARGIN, too_large
from ..protocol.errors import WarmexecError
from ..protocol.messages import VERSION

log = logging.getLogger("warmexec")


class Supervisor:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()

    async def call(self, op: str, wait: float | None, **fields: Any) -> dict:
        """The reply's map; WarmexecError for an error reply, no reply within wait seconds
        (None: while the supervisor answers pings) or no supervisor."""
        reply = await self._wait(self._send(op, fields), wait)
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
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
            self.reader = asyncio.get_running_loop().create_task(self._read())
        rid = next(self.ids)
        msg = {"v": VERSION, "id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        data = codec.pack(msg)
        if len(data) > codec.MAX_MESSAGE:
            raise WarmexecError(errors.BAD_REQUEST, too_large(len(data)))
        try:
            self.sock.send(data, zmq.NOBLOCK)  # queued by ZeroMQ: never waits on the supervisor
        except zmq.Again:
            raise WarmexecError(errors.UNREACHABLE, "cannot reach the supervisor") from None
        fut = self.waiting[rid] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _: self.waiting.pop(rid, None))
        return fut

    async def _read(self) -> None:
        while True:
            data = await self.sock.recv()
            try:
                msg = codec.unpack_map(data, MAX_REPLY)
            except codec.ProtocolError as exc:
                log.warning("undecodable reply from the supervisor: %s", exc)
                continue
            fut = self.waiting.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _wait(self, fut: asyncio.Future, timeout: float | None) -> dict:
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        try:
            while True:
                left = LIVENESS if end is None else min(LIVENESS, end - loop.time())
                if left <= 0:
                    raise WarmexecError(errors.TIMEOUT, f"no reply within {timeout}s")
                done, _ = await asyncio.wait((fut,), timeout=left)
                if done:
                    return fut.result()
                if end is None or end - loop.time() > 0:  # quiet for LIVENESS: is it there?
                    probe = self._send("ping", {})
                    done, _ = await asyncio.wait((fut, probe), timeout=LIVENESS,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    probe.cancel()
                    if not done:
                        raise WarmexecError(errors.UNREACHABLE, "the supervisor is not answering")
        finally:
            fut.cancel()  # a no-op once answered; a late reply is dropped
