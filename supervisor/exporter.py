"""Probes as Prometheus asks for them: ``/probe`` (a multi-target exporter) and ``/sd``.

``GET /probe?container=REF&module=NAME`` runs the module's command (probeconfig.py) in
the container REF names, through its warm worker, and answers the outcome in the
Prometheus text format, as blackbox_exporter answers its probes::

    probe_success 1
    probe_duration_seconds 0.0009
    probe_exit_code 0
    probe_timed_out 0
    probe_output_bytes{stream="stdout"} 3
    probe_output_bytes{stream="stderr"} 0
    probe_output_truncated 0

A command that could not run (the worker is unavailable, the limits are reached...) is
``probe_success 0`` with ``probe_error_info{code="..."} 1``; an unknown container or
module, or a bad query, is a 4xx that Prometheus sees as the target down (``up`` 0).

``GET /sd`` lists every served container for Prometheus's ``http_sd_configs``: the
target is the container's id, its labels ``__meta_warmexec_*`` (see docs/PROBES.md).

Both run on the metrics thread (httpserver.py) and never touch the loop's state: they
are requests on the supervisor's loopback socket (server.py), a ZeroMQ ROUTER on an
inproc endpoint, answered by the loop as it answers any client's ``exec`` and ``list``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Mapping

import zmq
import zmq.asyncio

from ..protocol import codec, errors
from ..protocol.messages import VERSION
from .httpserver import Request, Response, Route, text
from .probeconfig import ProbeModule, succeeded

SCRAPE_TIMEOUT = "x-prometheus-scrape-timeout-seconds"
SCRAPE_MARGIN = 0.25  # seconds left for the answer to reach Prometheus within its timeout
REPLY_GRACE = 2.0  # seconds past an exec's timeout to wait for the loop's reply
LIST_TIMEOUT = 5.0  # seconds for the loop to answer /sd's list
MAX_REF = 1024  # characters of a container reference in a query
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Error codes that mean the scrape asked for something that is not there: a 4xx.
NOT_THERE = {errors.NO_SUCH_CONTAINER: "404 Not Found", errors.AMBIGUOUS: "400 Bad Request",
             errors.BAD_REQUEST: "400 Bad Request"}


class Loopback:
    """The metrics thread's DEALER on the supervisor's loopback socket: many requests
    in flight, each reply matched to its request by id."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context.shadow(ctx)  # inproc needs the supervisor's context
        self.endpoint = endpoint
        self.sock: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task | None = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}

    async def call(self, op: str, wait: float, **fields: object) -> dict:
        """The loop's reply; TimeoutError if none came within wait seconds."""
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
            self.reader = asyncio.get_running_loop().create_task(self._read())
        req_id = next(self.ids)
        reply = self.pending[req_id] = asyncio.get_running_loop().create_future()
        msg = {"v": VERSION, "id": req_id, "op": op, **{k: v for k, v in fields.items() if v is not None}}
        try:
            return await asyncio.wait_for(self._round_trip(codec.pack(msg), reply), wait)
        finally:
            self.pending.pop(req_id, None)

    async def _round_trip(self, data: bytes, reply: asyncio.Future) -> dict:
        await self.sock.send(data)
        return await reply

    async def _read(self) -> None:
        while True:
            try:
                msg = codec.unpack_map(await self.sock.recv())
            except codec.ProtocolError:  # never from our own loop; if it were, one reply is lost
                continue
            waiting = self.pending.get(msg.get("id"))
            if waiting is not None and not waiting.done():  # a reply given up on is dropped
                waiting.set_result(msg)

    def close(self) -> None:
        """On the metrics thread, before the supervisor's context ends."""
        if self.reader is not None:
            self.reader.cancel()
        if self.sock is not None:
            self.sock.close(linger=0)


class Exporter:
    def __init__(self, loopback: Loopback, modules: Mapping[str, ProbeModule]) -> None:
        self.loopback = loopback
        self.modules = dict(modules)

    def routes(self) -> dict[str, Route]:
        return {"/probe": self.probe, "/sd": self.sd}

    async def probe(self, request: Request) -> Response:
        container, module_name = _one(request, "container"), _one(request, "module")
        if not container or len(container) > MAX_REF or "\0" in container:
            return text("400 Bad Request", "give one container=NAME_OR_ID (at most 1024 characters)\n")
        module = self.modules.get(module_name or "")
        if module is None:
            known = ", ".join(sorted(self.modules)) or "none: add [probe_modules.NAME] to the config"
            return text("400 Bad Request", f"unknown module {(module_name or '')[:64]!r}; known: {known}\n")
        try:
            timeout = deadline(module.timeout, request.headers.get(SCRAPE_TIMEOUT))
        except ValueError as exc:
            return text("400 Bad Request", f"{exc}\n")
        t0 = time.monotonic()
        try:
            reply = await self.loopback.call("exec", timeout + REPLY_GRACE, container=container,
                                             argv=list(module.argv), user=module.user,
                                             timeout=timeout, capture=module.capture)
        except TimeoutError:
            reply = {"ok": False, "error": {"code": errors.UNREACHABLE,
                                            "message": "the supervisor did not answer in time"}}
        took = time.monotonic() - t0
        error = reply.get("error") if not reply.get("ok") else None
        if error and error.get("code") in NOT_THERE:
            return text(NOT_THERE[error["code"]], f"{error['code']}: {error.get('message', '')}\n")
        return "200 OK", [("Content-Type", CONTENT_TYPE)], probe_text(module, reply, took)

    async def sd(self, request: Request) -> Response:
        try:
            reply = await self.loopback.call("list", LIST_TIMEOUT)
        except TimeoutError:
            return text("503 Service Unavailable", "the supervisor did not answer in time\n")
        if not reply.get("ok"):
            return text("503 Service Unavailable", f"{reply['error']['code']}: {reply['error']['message']}\n")
        body = json.dumps(sd_groups(reply["containers"])).encode()
        return "200 OK", [("Content-Type", "application/json")], body

    def close(self) -> None:
        self.loopback.close()


def _one(request: Request, key: str) -> str | None:
    values = request.query.get(key)
    return values[0] if values and len(values) == 1 else None


def deadline(module_timeout: float, header: str | None) -> float:
    """The exec's timeout: the module's, or less when the scrape's own timeout (less the
    margin its answer needs to get back) is shorter. ValueError for a bad header."""
    if header is None:
        return module_timeout
    try:
        scrape = float(header)
    except ValueError:
        scrape = math.nan
    if not math.isfinite(scrape) or scrape <= 0:
        raise ValueError(f"X-Prometheus-Scrape-Timeout-Seconds must be a positive number: {header[:32]!r}")
    room = scrape - SCRAPE_MARGIN if scrape > 2 * SCRAPE_MARGIN else scrape / 2
    return min(module_timeout, room)


def probe_text(module: ProbeModule, reply: dict, took: float) -> bytes:
    """One probe's outcome in the Prometheus text format."""
    ok = bool(reply.get("ok"))
    out, err = (reply.get(k) or b"" for k in ("stdout", "stderr")) if ok else (b"", b"")
    lines: list[str] = []

    def gauge(name: str, help_: str, *samples: tuple[str, float]) -> None:
        lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} gauge"))
        lines.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

    gauge("probe_success", "Whether the probe's command ran and the module accepted its outcome",
          ("", succeeded(module, reply) if ok else 0))
    gauge("probe_duration_seconds", "How long the probe took, request to reply", ("", took))
    gauge("probe_exit_code", "The command's exit code (128+N: killed by signal N; -1: did not run)",
          ("", reply.get("exit_code", -1) if ok else -1))
    gauge("probe_timed_out", "Whether the command was killed at the probe's deadline",
          ("", bool(reply.get("timed_out"))))
    gauge("probe_output_bytes", "Bytes of output kept (at most the module's capture)",
          ('{stream="stdout"}', len(out)), ('{stream="stderr"}', len(err)))
    gauge("probe_output_truncated", "Whether the command wrote more than the module's capture",
          ("", bool(reply.get("truncated"))))
    if module.regex is not None:
        gauge("probe_output_matched", "Whether the module's regex was found in the stdout kept",
              ("", ok and module.regex.search(out) is not None))
    if not ok:
        code = reply["error"]["code"]
        gauge("probe_error_info", "Why the command did not run (an error code of docs/PROTOCOL.md)",
              (f'{{code="{code}"}}', 1))
    return ("\n".join(lines) + "\n").encode()


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def sd_groups(rows: list[dict]) -> list[dict]:
    """Prometheus http_sd target groups: one per served container, its id the target."""
    groups = []
    for row in rows:
        labels = {"container_id": row["id"], "container_name": row.get("name") or row["id"],
                  "engine": row.get("engine"), "pod": row.get("pod"), "namespace": row.get("namespace"),
                  "image": row.get("image"), "containerd_namespace": row.get("containerd_namespace"),
                  "state": row.get("state")}
        groups.append({"targets": [row["id"]],
                       "labels": {f"__meta_warmexec_{k}": str(v or "") for k, v in labels.items()}})
    return groups
