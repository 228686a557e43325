"""The Python client for asyncio (pyzmq's ``zmq.asyncio``): one-shot and streamed execs.

    async with AsyncClient() as c:
        r = await c.exec("web1", ["cat", "/etc/hostname"])
        s = c.stream("web1", ["sh", "-c", "seq 1 3"])
        async for kind, *rest in s.events():    # ("started", exec_id, pid), ("output", 1, b"1\\n"), ...
            ...                                 # ("exit", reply) last
        print(s.result["exit_code"])

The same wire as the sync ``Client`` (client.py, stream_client.py): one DEALER socket,
one reader task handing each reply to the future of its request or to its stream's
queue. A stream gives back credit as the application takes output events (a quarter
of the window at a time) and beats its heart every HEARTBEAT seconds until it ends, so
an application that stops taking events stops the command, never memory here beyond
the window. Calls take a timeout (``TIMEOUT`` past it); a request over the frame limit
is refused before it is sent.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth

from . import codec, errors
from .client import default_endpoint, too_large
from .errors import WarmexecError
from .messages import VERSION
from .streams import DEFAULT_WINDOW, HEARTBEAT, STDIN_WINDOW

STDIN_CHUNK = 256 << 10


def _raise_for(reply: dict) -> dict:
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise WarmexecError(err.get("code", errors.INTERNAL), err.get("message", ""))
    return reply


class AsyncClient:
    def __init__(self, endpoint: str | None = None, context: zmq.asyncio.Context | None = None,
                 server_key: str | None = None, client_key: str | None = None) -> None:
        self.ctx = context or zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if server_key or client_key:
            self.sock.curve_serverkey, _ = zmq.auth.load_certificate(server_key)
            self.sock.curve_publickey, self.sock.curve_secretkey = zmq.auth.load_certificate(client_key)
        self.sock.connect(endpoint or default_endpoint())
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.sock.close(linger=0)

    async def _read(self) -> None:
        while True:
            msg = codec.unpack_map(await self.sock.recv())
            rid = msg.get("id")
            if rid in self._streams:
                self._streams[rid].put_nowait(msg)
            elif rid in self._waiting:
                future = self._waiting.pop(rid)
                if not future.done():
                    future.set_result(msg)

    def submit(self, op: str, _stream: bool = False, **fields: Any) -> int:
        """Send a request (without waiting); its id. _stream: its replies go to a queue."""
        rid = next(self._ids)
        msg = {"v": VERSION, "id": rid, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        data = codec.pack(msg)
        if len(data) > codec.MAX_MESSAGE:
            raise WarmexecError(errors.BAD_REQUEST, too_large(len(data)))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        if _stream:
            self._streams[rid] = asyncio.Queue()
        else:
            self._waiting[rid] = asyncio.get_running_loop().create_future()
        self.sock.send(data)  # a DEALER queues it (up to its high-water mark)
        return rid

    async def result(self, rid: int, timeout: float | None = 10.0) -> dict:
        future = self._waiting[rid]
        try:
            return _raise_for(await asyncio.wait_for(future, timeout))
        except asyncio.TimeoutError:
            raise WarmexecError(errors.TIMEOUT, f"no reply within {timeout}s") from None
        finally:
            self._waiting.pop(rid, None)

    async def call(self, op: str, timeout: float | None = 10.0, **fields: Any) -> dict:
        return await self.result(self.submit(op, **fields), timeout)

    async def exec(self, container: str, argv: list[str], *, timeout: float | None = None,
                   **fields: Any) -> dict:
        """A one-shot exec (fields as Client.exec's: env, cwd, user, stdin, capture, ...)."""
        wait = None if timeout is None else timeout + 30.0
        rid = self.submit("exec", container=container, argv=list(argv), timeout=timeout, **fields)
        return await self.result(rid, wait)

    def stream(self, container: str, argv: list[str], *, window: int = DEFAULT_WINDOW,
               **fields: Any) -> AsyncExecStream:
        """A streamed exec (fields: interactive, tty, rows, cols, user, env, timeout, ...)."""
        rid = self.submit("exec", True, container=container, argv=list(argv), stream=True, window=window,
                          **{k: (v or None) if isinstance(v, bool) else v for k, v in fields.items()})
        return AsyncExecStream(self, rid, window)

    async def inspect(self, exec_id: int) -> dict:
        return await self.call("inspect", exec_id=exec_id)


class AsyncExecStream:
    def __init__(self, client: AsyncClient, rid: int, window: int) -> None:
        self.client, self.id, self.window = client, rid, window
        self.queue = client._streams[rid]
        self.exec_id: int | None = None
        self.pid: int | None = None
        self.result: dict | None = None
        self.owed = 0
        self.heart: asyncio.Task | None = None

    async def events(self) -> AsyncIterator[tuple]:
        """("started", exec_id, pid), ("output", stream, data), then ("exit", reply);
        an error reply raises WarmexecError."""
        try:
            while self.result is None:
                msg = await self.queue.get()
                if not msg.get("ok"):
                    _raise_for(msg)
                kind = msg.get("event")
                if kind == "started":
                    self.exec_id, self.pid = msg["exec_id"], msg.get("pid")
                    self.heart = asyncio.get_running_loop().create_task(self._beat())
                    yield ("started", self.exec_id, self.pid)
                elif kind == "output":
                    self.owed += len(msg["data"])
                    if self.owed >= max(1, self.window // 4):
                        self._notify("credit", bytes=self.owed)
                        self.owed = 0
                    yield ("output", msg["stream"], msg["data"])
                elif kind == "exit":
                    self.result = msg
                    yield ("exit", msg)
        finally:
            self._end()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self._notify("credit", bytes=0)

    def _notify(self, op: str, **fields: Any) -> None:
        self.client.sock.send(codec.pack({"v": VERSION, "id": None, "op": op, "exec_id": self.exec_id,
                                          **fields}))

    def _end(self) -> None:
        if self.heart is not None:
            self.heart.cancel()
        self.client._streams.pop(self.id, None)

    async def write(self, data: bytes, eof: bool = False) -> None:
        """Send data to an interactive exec's stdin, at most STDIN_WINDOW unanswered."""
        view, pending = memoryview(data), []
        while view or eof:
            part, view = bytes(view[:STDIN_CHUNK]), view[STDIN_CHUNK:]
            last = not view
            pending.append(asyncio.ensure_future(self.client.call(
                "stdin", exec_id=self.exec_id, data=part, eof=(eof and last) or None)))
            if len(pending) * STDIN_CHUNK >= STDIN_WINDOW or last:
                for reply in await asyncio.gather(*pending):
                    if reply.get("closed"):
                        return
                pending = []
            if last:
                return

    async def signal(self, sig: int | str = "KILL", group: bool = False) -> dict:
        return await self.client.call("signal", exec_id=self.exec_id, signal=sig, group=group or None)

    async def resize(self, rows: int, cols: int) -> dict:
        return await self.client.call("resize", exec_id=self.exec_id, rows=rows, cols=cols)

    async def leave(self) -> dict:
        reply = await self.client.call("leave", exec_id=self.exec_id)
        self._end()
        return reply
