"""``warmexec cri``: a CRI endpoint that answers ExecSync from warm workers and forwards
everything else to the container runtime.

The kubelet talks to one CRI socket. This server listens there (``--listen``) and is a
client of the supervisor like any other (``--endpoint``). Every call, of
``runtime.v1.RuntimeService``, ``runtime.v1.ImageService`` or a method it has never
heard of, is forwarded to ``--upstream`` as raw bytes in a stream-to-stream call (gRPC
frames every cardinality alike), with its metadata, deadline and cancellation; the
upstream's initial metadata, messages, status, details and trailers come back as they
are. Only ``/runtime.v1.RuntimeService/ExecSync`` is answered here, and only for a
container the supervisor serves and that is a CRI container (not a pod's sandbox), in
the words of the runtime behind (:mod:`.cri_runtimes`); anything else, and any exec
warmexec cannot start as asked, is forwarded too, so the kubelet gets the runtime's own
answer. Each ExecSync is counted by the way it went (:mod:`.cri_metrics`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc

from ..protocol import errors
from ..protocol.errors import WarmexecError
from . import cri_runtimes as runtimes
from .cri_client import Supervisor
from .cri_metrics import UPSTREAM, WARM, CriMetrics
from .cri_runtimes import go_duration  # noqa: F401 - part of this module's surface
from .cri_wire import (
    decode_exec_sync_request,
    decode_runtime_name,
    encode_exec_sync_response,  # noqa: F401 - the tests' stand-in runtimes use it
    fields,
)

log = logging.getLogger("warmexec")

EXEC_SYNC = "/runtime.v1.RuntimeService/ExecSync"
VERSION = "/runtime.v1.RuntimeService/Version"
MAX_MESSAGE = 64 << 20  # both ways: containerd's own limit is 16 MiB per stream of output
OUTPUT_CAP = 16 << 20  # bytes of each stream an ExecSync keeps, as containerd keeps them
SERVED_TTL = 1.0  # seconds a list of the supervisor's containers is trusted
LIST_TIMEOUT = 0.5  # seconds: a supervisor slower than this to list is taken as down
VERSION_RETRY = 5.0  # seconds between asks of the runtime's name while it does not answer
TIMEOUT_STATUS = grpc.StatusCode.DEADLINE_EXCEEDED  # containerd's timeout (cri_runtimes)
#: warmexec's refusals before anything ran: the runtime may answer those itself.
NOT_STARTED = frozenset((errors.NO_SUCH_CONTAINER, errors.CONTAINER_EXITED, errors.AMBIGUOUS, errors.BUSY,
                         errors.WORKER_UNAVAILABLE, errors.CONTAINER_PAUSED, errors.UNREACHABLE))
#: Request metadata that belongs to the connection, not to the call.
_HOP_BY_HOP = ("user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout")
_fields = fields  # the tests' protobuf reader

#: CRI container types the supervisor reports: containerd's and CRI-O's annotation values.
CRI_CONTAINER = "container"


class Served:
    """Which ids the supervisor serves, and how, asked at most every SERVED_TTL."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.rows: dict[str, tuple[str | None, str]] = {}  # id -> (cri container type, state)
        self.up = True
        self.at = -SERVED_TTL
        self.asking: asyncio.Task | None = None

    async def why_not(self, cid: str) -> str | None:
        """None when warmexec can answer an ExecSync of cid, else the reason it cannot."""
        if time.monotonic() - self.at >= SERVED_TTL:
            if self.asking is None:  # one list at a time, whoever asks
                self.asking = asyncio.get_running_loop().create_task(self._list())
            await asyncio.shield(self.asking)
        if not self.up:
            return "supervisor_unreachable"
        row = self.rows.get(cid)
        if row is None:
            return "unknown_container"  # or not warm yet: it goes upstream until the next list
        if row[0] != CRI_CONTAINER:
            return "not_cri_container"
        return None if row[1] == "READY" else "not_ready"

    async def _list(self) -> None:
        try:
            rows = (await self.supervisor.call("list", LIST_TIMEOUT))["containers"]
            self.rows = {r["id"]: (r.get("cri_container_type"), r["state"]) for r in rows}
            self.up = True
        except WarmexecError as exc:  # down or stuck: the runtime answers, asked again SERVED_TTL on
            log.debug("supervisor not listing (%s): ExecSync goes to the runtime", exc)
            self.rows, self.up = {}, False
        finally:
            self.at, self.asking = time.monotonic(), None


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel, endpoint: str | None, kind: str | None = None,
                 metrics: CriMetrics | None = None) -> None:
        from ..protocol.client import default_endpoint

        self.upstream = upstream
        self.supervisor = Supervisor(endpoint or default_endpoint())
        self.served = Served(self.supervisor)
        self.metrics = metrics or CriMetrics()
        self.kind_ = kind or runtimes.CONTAINERD  # --upstream-kind, else the runtime's Version (below)
        self.kind_at: float | None = 0.0 if kind else None  # when the runtime's name was known
        self.kind_asked = -VERSION_RETRY
        if kind:
            self.metrics.upstream_kind(kind)
        self.exec_handler = grpc.unary_unary_rpc_method_handler(self.exec_sync)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method == EXEC_SYNC:
            return self.exec_handler
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

    # ---- which runtime -------------------------------------------------------------
    async def kind(self) -> str:
        """Whose answers to give: --upstream-kind, else the runtime's own Version reply
        (asked once it answers, at most every VERSION_RETRY until then; containerd's
        meanwhile)."""
        if self.kind_at is None and time.monotonic() - self.kind_asked >= VERSION_RETRY:
            self.kind_asked = time.monotonic()
            try:
                name = decode_runtime_name(await self.upstream.unary_unary(VERSION)(b"", timeout=2))
            except (grpc.aio.AioRpcError, ValueError) as exc:
                log.debug("the runtime's Version is not known yet: %s", exc)
            else:
                self.kind_, self.kind_at = runtimes.kind_of(name), time.monotonic()
                self.metrics.upstream_kind(self.kind_)
                log.info("upstream runtime %r: answering ExecSync as %s does", name, self.kind_)
        return self.kind_

    # ---- ExecSync ------------------------------------------------------------------
    async def exec_sync(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        cid, path, reason, answer = await self._decide(request)
        if path == WARM:
            self.metrics.execsync(WARM, reason, time.perf_counter() - t0, cid)
            if isinstance(answer, runtimes.Refusal):
                await context.abort(answer.code, answer.details)
            return answer
        try:
            return await self.forward_unary(EXEC_SYNC, request, context)
        finally:
            self.metrics.execsync(UPSTREAM, reason, time.perf_counter() - t0, cid)

    async def _decide(self, request: bytes) -> tuple[str, str, str, bytes | runtimes.Refusal | None]:
        """(container id, path, reason, warm answer): the answer is the response's bytes or
        the error to give, and None for the upstream path."""
        try:
            cid, cmd, timeout = decode_exec_sync_request(request)
        except (ValueError, UnicodeDecodeError):
            return "", UPSTREAM, "undecodable", None  # the runtime says why
        if not cmd:
            return cid, UPSTREAM, "empty_cmd", None
        why = await self.served.why_not(cid)
        if why is not None:
            return cid, UPSTREAM, why, None
        try:
            reply = await self.supervisor.exec(cid, cmd, timeout if timeout > 0 else None, OUTPUT_CAP)
        except WarmexecError as exc:
            if exc.code == errors.UNREACHABLE:
                return cid, UPSTREAM, "supervisor_unreachable", None
            if exc.code in NOT_STARTED:
                return cid, UPSTREAM, "refused", None
            # it may have run: asking the runtime would run it twice
            return cid, WARM, "lost", runtimes.Refusal(grpc.StatusCode.UNKNOWN, f"warmexec: {exc.code}: "
                                                                                f"{exc.message}")
        if reply.get("exec_error"):  # it never started: the runtime's words
            return cid, UPSTREAM, "cannot_start", None
        kind = await self.kind()
        try:
            if reply["timed_out"]:
                return cid, WARM, "timed_out", runtimes.timed_out(kind, timeout)
            return cid, WARM, "served", runtimes.exited(kind, reply["stdout"], reply["stderr"],
                                                        reply["exit_code"])
        except runtimes.Refusal as refusal:
            return cid, WARM, "timed_out" if reply["timed_out"] else "too_large", refusal


def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in context.invocation_metadata() or ()
            if not k.startswith(":") and k not in _HOP_BY_HOP]


_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def socket_like_upstream(listen: str, upstream: str) -> None:
    """The listening socket gets the runtime's socket's owner and mode (root-only on a
    stock containerd or CRI-O: 0660 root:root), 0600 when that is not a local socket."""
    if not listen.startswith("unix:"):
        return
    path = _unix_path(listen)
    mode, uid, gid = 0o600, 0, 0
    if upstream.startswith("unix:"):
        try:
            st = os.stat(_unix_path(upstream))
            mode, uid, gid = st.st_mode & 0o777, st.st_uid, st.st_gid
        except OSError:
            pass
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _unix_path(url: str) -> str:
    return url[len("unix://"):] if url.startswith("unix://") else url[len("unix:"):]


async def serve(listen: str, upstream: str, endpoint: str | None, kind: str | None = None,
                metrics_addr: str | None = None) -> None:
    metrics = CriMetrics()
    exporter = None
    if metrics_addr:
        from .httpserver import MetricsServer
        host, _, port = metrics_addr.rpartition(":")
        try:  # its own thread and loop, started from a thread as it starts its loop itself
            exporter = await asyncio.to_thread(MetricsServer, metrics.registry, host or "127.0.0.1",
                                               int(port))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"warmexec cri: cannot serve metrics on {metrics_addr!r}: {exc}") from None
    if listen.startswith("unix:"):
        os.makedirs(os.path.dirname(_unix_path(listen)) or ".", mode=0o700, exist_ok=True)
    channel = grpc.aio.insecure_channel(upstream, options=_OPTIONS)
    server = grpc.aio.server(options=_OPTIONS)
    proxy = Proxy(channel, endpoint, kind, metrics)
    server.add_generic_rpc_handlers((proxy,))
    old = os.umask(0o177)  # no moment when the socket is open to all
    try:
        if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
            raise SystemExit(f"warmexec cri: cannot listen on {listen}")
        await server.start()
    finally:
        os.umask(old)
    socket_like_upstream(listen, upstream)
    log.info("CRI on %s, forwarding to %s", listen, upstream)
    if kind is None:
        await proxy.kind()  # the runtime's name, if it answers now
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # handlers only record
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(5)  # calls in flight get 5 s; the kubelet reconnects to the next one
    await channel.close()
    proxy.supervisor.close()
    if exporter is not None:
        exporter.close()
