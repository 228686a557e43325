"""Prometheus metrics, exported by the supervisor alone from an injected registry.

Names follow Prometheus conventions: ``warmexec_`` prefix, base units, ``_total``
counters, bounded labels (container, exit code, error code: never pid or argv).
Gauges about workers and in-flight execs are computed at scrape time from the live
container table, so they cannot drift. The ``container`` label can be dropped for
hosts with thousands of containers; its series are removed when a container goes away.
They are served over HTTP by :class:`MetricsServer`, bounded in connections, threads
and time (any local user can reach it).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted

from ..protocol.errors import ALL
from .lifecycle import State

if TYPE_CHECKING:
    from .execs import Exec
    from .handles import Served

log = logging.getLogger("warmexec")

HOOK_KINDS = ("start", "exit")
HOOK_FAILURES = ("timeout", "exit_status", "spawn", "dropped", "exception")

# 50 µs .. 10 s: the warm path lives at the bottom, runc-like execs and hangs at the top.
SPAWN_BUCKETS = (50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3,
                 7.5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 2.5, 10.0)
DURATION_BUCKETS = (100e-6, 250e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 10e-3, 25e-3,
                    50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, container_label: bool = True) -> None:
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        self.container_label = container_label
        self.k8s: dict[str, tuple[str, str]] = {}  # container -> (pod, namespace), "" if none
        # container -> its spawn and duration series and its exit-code series, looked up
        # once: labels() costs a lock and a tuple per call, and every exec needs three.
        self._series: dict[str, tuple[Any, Any, dict[int, Any]]] = {}
        c = ("container", "pod", "namespace") if container_label else ()
        r = self.registry
        self.duration = Histogram("warmexec_exec_duration_seconds",
                                  "Exec request received to reply (process exited)", c,
                                  registry=r, buckets=DURATION_BUCKETS)
        self.spawn = Histogram("warmexec_exec_spawn_seconds", "Exec request received to pid known",
                               c, registry=r, buckets=SPAWN_BUCKETS)
        self.exits = Counter("warmexec_exec_exits", "Execs that ran, by exit code", (*c, "code"), registry=r)
        self.errors = Counter("warmexec_exec_errors", "Requests answered with an error, by error code",
                              ("code",), registry=r)
        self.timeouts = Counter("warmexec_exec_timeouts", "Execs killed at their timeout", c, registry=r)
        self.oom = Counter("warmexec_exec_oom_kills", "Execs killed by the container's OOM killer",
                           c, registry=r)
        self.signals = Counter("warmexec_exec_signals", "Execs killed by a signal, by signal name",
                               ("signal",), registry=r)
        self.request_bytes = Histogram("warmexec_request_size_bytes", "Size of request frames",
                                       registry=r, buckets=(64, 256, 1024, 4096, 16384, 65536,
                                                            262144, 1 << 20, 4 << 20))
        self.hook_seconds = Histogram("warmexec_hook_duration_seconds",
                                      "Command hooks, start to exit", ("kind",), registry=r,
                                      buckets=DURATION_BUCKETS)
        self.restarts = Counter("warmexec_worker_restarts",
                                "Deaths of containers' own workers (each restarted after a "
                                "backoff, or the last one before FATAL)", registry=r)
        self.warmup_seconds = Histogram("warmexec_worker_warmup_seconds",
                                        "Worker fork to ready (namespaces joined)", registry=r,
                                        buckets=SPAWN_BUCKETS)
        self.hook_runs = Counter("warmexec_hook_runs", "Hooks started", ("kind",), registry=r)
        self.hook_failures = Counter("warmexec_hook_failures", "Hooks that failed, timed out or were dropped",
                                     ("kind", "reason"), registry=r)
        self.events_dropped = Counter("warmexec_events_dropped",
                                      "Events not published: a subscriber was too slow", registry=r)
        self._table: Callable[[], Iterable[Served]] = lambda: ()
        r.register(_LiveCollector(self))
        ProcessCollector(registry=r)  # the supervisor's own CPU, memory, fds
        PlatformCollector(registry=r)
        # Series that exist from the start, at 0: rate() and increase() then see the
        # first error or hook failure too, not only the second.
        for code in sorted(ALL):
            self.errors.labels(code)
        for kind in HOOK_KINDS:
            self.hook_runs.labels(kind)
            for reason in HOOK_FAILURES:
                self.hook_failures.labels(kind, reason)

    def watch(self, table: Callable[[], Iterable[Served]]) -> None:
        """Give the scrape-time gauges the container table (a callable returning runtimes)."""
        self._table = table

    def _c(self, container: str) -> tuple[str, ...]:
        if not self.container_label:
            return ()
        return (container, *self.k8s.get(container, ("", "")))

    def _of(self, container: str) -> tuple[Any, Any, dict[int, Any]]:
        series = self._series.get(container)
        if series is None:
            series = self._series[container] = (_child(self.spawn, self._c(container)),
                                                _child(self.duration, self._c(container)), {})
        return series

    # ---- called from the event loop ------------------------------------------------
    def spawned(self, container: str, seconds: float) -> None:
        self._of(container)[0].observe(seconds)

    def finished(self, ex: Exec, reply: dict) -> None:
        container = ex.req.container
        if not reply.get("ok"):
            self.errors.labels(reply["error"]["code"]).inc()
            return
        _, duration, exits = self._of(container)
        duration.observe(reply["timings"]["total"] / 1e6)
        code = reply["exit_code"]
        series = exits.get(code)
        if series is None:
            series = exits[code] = self.exits.labels(*self._c(container), str(code))
        series.inc()
        if reply.get("signal"):
            self.signals.labels(_signame(reply["signal"])).inc()
        if reply.get("timed_out"):
            _child(self.timeouts, self._c(container)).inc()
        if reply.get("oom_killed"):
            _child(self.oom, self._c(container)).inc()

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def worker_restart(self) -> None:
        self.restarts.inc()

    def request(self, size: int) -> None:
        self.request_bytes.observe(size)

    def hook_duration(self, kind: str, seconds: float) -> None:
        self.hook_seconds.labels(kind).observe(seconds)

    def event_dropped(self) -> None:
        self.events_dropped.inc()

    def warmup(self, seconds: float) -> None:
        self.warmup_seconds.observe(seconds)

    def hook(self, kind: str, failure: str | None = None) -> None:
        if failure is None:
            self.hook_runs.labels(kind).inc()
        else:
            self.hook_failures.labels(kind, failure).inc()

    def event(self, topic: str, fields: dict) -> None:
        if topic == "container.added":
            self._series.pop(fields["container"], None)  # its pod labels may have changed
            self.k8s[fields["container"]] = (fields.get("pod") or "", fields.get("namespace") or "")
        elif topic == "container.removed":
            self._series.pop(fields["container"], None)
            if self.container_label:
                self._forget(fields["container"])
            self.k8s.pop(fields["container"], None)

    def _forget(self, container: str) -> None:
        """Drop every series of a container that went away, so none goes stale."""
        for metric in (self.duration, self.spawn, self.timeouts, self.oom, self.exits):
            for labels in [k for k in list(metric._metrics) if k[0] == container]:
                metric.remove(*labels)


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    """The series for labels; the metric itself when it has none (no container label)."""
    return metric.labels(*labels) if labels else metric


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


class _LiveCollector:
    """warmexec_workers{state} and warmexec_exec_inflight, read from the live table."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for _ in range(3):  # the loop thread may resize the table mid-scrape: retry
            try:
                rows = list(self.metrics._table())
                states = {s.name: 0 for s in State if s != State.EXITED}
                inflight = 0
                for c in rows:  # served containers, by their own workers
                    states[c.state.name] = states.get(c.state.name, 0) + 1
                    inflight += c.open_execs()
                break
            except RuntimeError:
                continue
        else:
            return
        workers = GaugeMetricFamily("warmexec_workers", "Container workers by state", labels=["state"])
        for name, n in states.items():
            workers.add_metric([name], n)
        yield workers
        yield GaugeMetricFamily("warmexec_exec_inflight", "Execs received and not yet answered",
                                value=inflight)
        yield GaugeMetricFamily("warmexec_containers", "Active containers", value=len(rows))


# ---- the HTTP endpoint ---------------------------------------------------------------

MAX_CONNECTIONS = 32  # open at once; past it the oldest still sending its request goes
REQUEST_TIMEOUT = 5.0  # seconds to send the request line and headers
WRITE_TIMEOUT = 10.0  # seconds to take the response
MAX_REQUEST_HEAD = 8192  # bytes of request line and headers


class MetricsServer:
    """The metrics endpoint: one thread running one asyncio loop, bounded everywhere.

    prometheus_client's own server starts a thread per connection and reads without a
    timeout: a local user opening connections that never send a byte pinned one thread
    each, without limit. Here a connection is a coroutine on one thread. It has
    REQUEST_TIMEOUT to send a request head of at most MAX_REQUEST_HEAD bytes and
    WRITE_TIMEOUT to take its response, one response per connection. At most
    MAX_CONNECTIONS are open: a new one past that closes the oldest connection still
    waiting for its request (itself, if it is the only one), so idle or slow clients can
    neither lock a scraper out for long nor pin more than MAX_CONNECTIONS head buffers
    and responses.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        # Open connections, oldest first -> True while it has not sent its request.
        self.live: dict[asyncio.StreamWriter, bool] = {}
        self.server = self.loop.run_until_complete(  # a bind error is raised here, at once
            asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, name="warmexec-metrics",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving, end every connection, stop the thread (tests; a supervisor
        exits with it running)."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._admit(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if writer in self.live:
                self.live[writer] = False
            writer.transport.set_write_buffer_limits(0)  # drain() returns once all is sent
            writer.write(self.respond(head))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        except Exception:
            log.exception("internal error serving metrics")
        finally:
            self.live.pop(writer, None)
            writer.transport.abort()  # sent, or not taken in time: nothing is left to wait for

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        """Past MAX_CONNECTIONS, close the oldest connection yet to send its request."""
        self.live[writer] = True
        if len(self.live) > MAX_CONNECTIONS:
            victim = next(w for w, waiting in self.live.items() if waiting)  # writer, at worst
            del self.live[victim]
            victim.transport.abort()  # its coroutine ends on the reset

    def respond(self, head: bytes) -> bytes:
        """The whole HTTP response to a request head, as prometheus_client's own server
        answers it: any path but /favicon.ico is the scrape."""
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        url = urlsplit(rest.rpartition(" ")[0] or rest)
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if method == "OPTIONS":
            return _http("200 OK", [("Allow", "OPTIONS,GET")], b"")
        if method != "GET":
            return _http("405 Method Not Allowed", [("Allow", "OPTIONS,GET")],
                         f"# HTTP 405 Method Not Allowed: {method[:32]}; use OPTIONS or GET\n".encode())
        if url.path == "/favicon.ico":
            return _http("200 OK", [], b"")
        encoder, content_type = choose_encoder(fields.get("accept", ""))
        registry = self.registry
        names = parse_qs(url.query).get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        body, headers = encoder(registry), [("Content-Type", content_type)]
        if gzip_accepted(fields.get("accept-encoding", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return _http("200 OK", headers, body)


def _http(status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def start_http_server(port: int, addr: str = "127.0.0.1",
                      registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """prometheus_client.start_http_server's signature, served by MetricsServer."""
    return MetricsServer(registry, addr, port)
