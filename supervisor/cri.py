"""``warmexec cri``: a CRI endpoint that answers ExecSync from warm workers and forwards
everything else to the container runtime.

The kubelet talks to one CRI socket. This server listens there (``--listen``) and is a
client of the supervisor like any other (``--endpoint``). Every call, of
``runtime.v1.RuntimeService``, ``runtime.v1.ImageService`` or a method it has never
heard of, is forwarded to ``--upstream`` as raw bytes in a stream-to-stream call (gRPC
frames every cardinality alike), with its metadata, deadline and cancellation; the
upstream's initial metadata, messages, status, details and trailers come back as they
are. Only ``/runtime.v1.RuntimeService/ExecSync`` is answered here, and only for a
container the supervisor serves and that is a CRI container (not a pod's sandbox);
anything else, and any exec warmexec cannot start as asked, is forwarded too, so the
kubelet gets the runtime's own answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from ..protocol import errors
from ..protocol.client import Client
from ..protocol.errors import WarmexecError

log = logging.getLogger("warmexec")

EXEC_SYNC = "/runtime.v1.RuntimeService/ExecSync"
MAX_MESSAGE = 64 << 20  # both ways: containerd's own limit is 16 MiB per stream of output
OUTPUT_CAP = 16 << 20  # bytes of each stream an ExecSync keeps, as containerd keeps them
SERVED_TTL = 1.0  # seconds a list of the supervisor's containers is trusted
LIST_TIMEOUT = 0.5  # seconds: a supervisor slower than this to list is taken as down
#: What containerd 1.6 answers an ExecSync past its timeout, once it has killed the
#: command (tests/system/test_cri_box.py): its output is dropped.
TIMEOUT_STATUS = grpc.StatusCode.DEADLINE_EXCEEDED
TIMEOUT_MESSAGE = "failed to exec in container: timeout {timeout} exceeded: context deadline exceeded"
#: containerd's gRPC server sends no reply over 16 MiB: a reply that large (both streams
#: count) is RESOURCE_EXHAUSTED, as the kubelet gets it from containerd.
MAX_REPLY = 16 << 20
#: warmexec's refusals before anything ran: the runtime may answer those itself.
NOT_STARTED = frozenset((errors.NO_SUCH_CONTAINER, errors.CONTAINER_EXITED, errors.AMBIGUOUS, errors.BUSY,
                         errors.WORKER_UNAVAILABLE, errors.CONTAINER_PAUSED, errors.UNREACHABLE))
#: Request metadata that belongs to the connection, not to the call.
_HOP_BY_HOP = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")


# ---- protobuf, for the two messages warmexec reads and writes ------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of each field; unknown ones are the caller's to skip."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise ValueError("truncated field")
            value, i = data[i:i + size], i + size
        elif kind == 1:
            value, i = data[i:i + 8], i + 8
        elif kind == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {kind}")
        yield number, kind, value


def decode_exec_sync_request(data: bytes) -> tuple[str, list[str], int]:
    """ExecSyncRequest: container_id = 1, repeated cmd = 2, timeout (seconds) = 3."""
    cid, cmd, timeout = "", [], 0
    for number, kind, value in _fields(data):
        if number == 1 and kind == 2:
            cid = value.decode()
        elif number == 2 and kind == 2:
            cmd.append(value.decode())
        elif number == 3 and kind == 0:
            timeout = value - (1 << 64) if value >= 1 << 63 else value
    return cid, cmd, timeout


def _put_varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_exec_sync_response(stdout: bytes, stderr: bytes, exit_code: int) -> bytes:
    """ExecSyncResponse: stdout = 1, stderr = 2, exit_code = 3 (int32; proto3 leaves out
    what is empty or zero)."""
    out = bytearray()
    for number, data in ((1, stdout), (2, stderr)):
        if data:
            out += _put_varint(number << 3 | 2) + _put_varint(len(data)) + data
    if exit_code:
        out += _put_varint(3 << 3) + _put_varint(exit_code)
    return bytes(out)


# ---- the server ----------------------------------------------------------------------
class Served:
    """Which ids the supervisor serves as CRI containers, asked at most every SERVED_TTL."""

    def __init__(self, call) -> None:
        self.call = call
        self.ids: set[str] = set()
        self.at = 0.0

    def has(self, cid: str) -> bool:
        if time.monotonic() - self.at < SERVED_TTL:
            return cid in self.ids  # one not warm yet goes upstream until the next list
        try:
            rows = self.call("list")["containers"]
        except WarmexecError as exc:  # the supervisor is down or stuck: the runtime answers,
            log.debug("supervisor not listing (%s): ExecSync goes to the runtime", exc)
            rows = []                 # and we ask again SERVED_TTL from now
        self.ids = {r["id"] for r in rows
                    if r.get("cri_container_type") == "container" and r["state"] == "READY"}
        self.at = time.monotonic()
        return cid in self.ids


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel, endpoint: str | None, threads: int = 32) -> None:
        self.upstream = upstream
        self.endpoint = endpoint
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="warmexec-cri")
        self.local = threading.local()  # a ZeroMQ socket per thread: they are not shared
        self.served = Served(self._call)
        self.served_lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method == EXEC_SYNC:
            return grpc.unary_unary_rpc_method_handler(self.exec_sync)
        return grpc.stream_stream_rpc_method_handler(functools.partial(self.forward, details.method))

    # ---- forwarding --------------------------------------------------------------
    async def forward(self, method: str, requests: AsyncIterator[bytes],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self.upstream.stream_stream(method)(requests, metadata=_metadata(context),
                                                   timeout=context.time_remaining())
        try:
            await context.send_initial_metadata(tuple(await call.initial_metadata() or ()))
            async for response in call:
                yield response
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        finally:
            call.cancel()  # a no-op once it is done; the kubelet went away otherwise

    async def forward_unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        call = self.upstream.unary_unary(method)(request, metadata=_metadata(context),
                                                 timeout=context.time_remaining())
        try:
            await context.send_initial_metadata(tuple(await call.initial_metadata() or ()))
            response = await call
            context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
            return response
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
        finally:
            call.cancel()

    # ---- ExecSync ------------------------------------------------------------------
    async def exec_sync(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            cid, cmd, timeout = decode_exec_sync_request(request)
        except (ValueError, UnicodeDecodeError):
            return await self.forward_unary(EXEC_SYNC, request, context)  # the runtime says why
        if not cmd:
            return await self.forward_unary(EXEC_SYNC, request, context)
        try:
            reply = await asyncio.get_running_loop().run_in_executor(self.pool, self._exec, cid, cmd, timeout)
        except WarmexecError as exc:  # it may have run: asking the runtime would run it twice
            await context.abort(grpc.StatusCode.UNKNOWN, f"warmexec: {exc.code}: {exc.message}")
        if reply is None or reply.get("exec_error"):  # not ours, or it never started: the
            return await self.forward_unary(EXEC_SYNC, request, context)  # runtime's words
        if reply["timed_out"]:
            await context.abort(TIMEOUT_STATUS, TIMEOUT_MESSAGE.format(timeout=go_duration(timeout)))
        response = encode_exec_sync_response(reply["stdout"], reply["stderr"], reply["exit_code"])
        if len(response) > MAX_REPLY:
            too_large = f"grpc: trying to send message larger than max ({len(response)} vs. {MAX_REPLY})"
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)
        return response

    def _exec(self, cid: str, cmd: list[str], timeout: int) -> dict | None:
        """warmexec's reply; None where nothing ran and the runtime should answer (a
        container we do not serve, a sandbox, a refusal before the start)."""
        try:
            with self.served_lock:
                if not self.served.has(cid):
                    return None
            return self._client().exec(cid, cmd, timeout=timeout if timeout > 0 else None, capture=OUTPUT_CAP)
        except WarmexecError as exc:
            if exc.code in NOT_STARTED:
                return None
            raise

    def _call(self, op: str) -> dict:
        return self._client().call(op, timeout=LIST_TIMEOUT)

    def _client(self) -> Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = Client(self.endpoint)
        return client


def go_duration(seconds: int) -> str:
    """Whole seconds as Go's time.Duration prints them (containerd's messages): 1s, 1m30s, 1h0m0s."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in context.invocation_metadata() or ()
            if not k.startswith(":") and k not in _HOP_BY_HOP]


_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


async def serve(listen: str, upstream: str, endpoint: str | None) -> None:
    channel = grpc.aio.insecure_channel(upstream, options=_OPTIONS)
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((Proxy(channel, endpoint),))
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        raise SystemExit(f"warmexec cri: cannot listen on {listen}")
    await server.start()
    log.info("CRI on %s, forwarding to %s", listen, upstream)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # handlers only record
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(5)  # calls in flight get 5 s; the kubelet reconnects to the next one
    await channel.close()
