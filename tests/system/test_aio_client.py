"""The asyncio client (protocol/aio_client.py) against a real supervisor: one-shot and
streamed execs, credit, stdin, errors, several streams at once on one socket."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from warmexec.protocol import errors
from warmexec.protocol.aio_client import AsyncClient
from warmexec.protocol.errors import WarmexecError

pytestmark = pytest.mark.root


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_one_shot_exec_and_an_error(supervisor, container):
    async def main():
        async with AsyncClient(supervisor.endpoint) as c:
            r = await c.exec(container, ["sh", "-c", "echo hi; exit 3"], timeout=5)
            assert (r["exit_code"], r["stdout"]) == (3, b"hi\n")
            with pytest.raises(WarmexecError) as e:
                await c.exec("no-such-container", ["true"])
            assert e.value.code == errors.NO_SUCH_CONTAINER
    _run(main())


def test_streamed_output_needs_and_gets_credit(supervisor, container):
    async def main():
        async with AsyncClient(supervisor.endpoint) as c:
            s = c.stream(container, ["sh", "-c", "seq 1 200000; echo e >&2; exit 4"], window=32 << 10)
            out = {1: bytearray(), 2: bytearray()}
            kinds = []
            async for kind, *rest in s.events():
                kinds.append(kind)
                if kind == "output":
                    out[rest[0]] += rest[1]
            assert kinds[0] == "started" and kinds[-1] == "exit" and s.result["exit_code"] == 4
            assert bytes(out[1]) == "".join(f"{i}\n" for i in range(1, 200001)).encode()
            assert bytes(out[2]) == b"e\n"
    _run(main())


def test_stdin_and_two_streams_at_once(supervisor, container):
    payload = os.urandom(3 << 20)

    async def digest(c, data):
        s = c.stream(container, ["sha256sum"], interactive=True)
        got = bytearray()
        async for kind, *rest in s.events():
            if kind == "started":
                writer = asyncio.ensure_future(s.write(data, eof=True))
            elif kind == "output":
                got += rest[1]
        await writer
        return bytes(got).split()[0].decode()

    async def main():
        async with AsyncClient(supervisor.endpoint) as c:
            other = payload[::-1]
            a, b = await asyncio.gather(digest(c, payload), digest(c, other))
            assert a == hashlib.sha256(payload).hexdigest() and b == hashlib.sha256(other).hexdigest()
    _run(main())


def test_a_signal_ends_a_stream(supervisor, container):
    async def main():
        async with AsyncClient(supervisor.endpoint) as c:
            s = c.stream(container, ["sleep", "100"])
            async for kind, *_rest in s.events():
                if kind == "started":
                    assert (await c.inspect(s.exec_id))["running"]
                    await s.signal("TERM")
            assert s.result["exit_code"] == 143
    _run(main())
