"""Prometheus metrics, exported by the supervisor alone from an injected registry.

Names follow Prometheus conventions: ``warmexec_`` prefix, base units, ``_total``
counters, bounded labels (container, exit code, error code: never pid or argv).
Gauges about workers and in-flight execs are computed at scrape time from the live
container table, so they cannot drift. The ``container`` label can be dropped for
hosts with thousands of containers; its series are removed when a container goes away.
They are served over HTTP by httpserver.py's ``MetricsServer``, bounded in connections,
threads and time (any local user can reach it).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily

from ..protocol.errors import ALL
from .lifecycle import State

if TYPE_CHECKING:
    from .execs import Exec
    from .handles import Served

log = logging.getLogger("warmexec")

HOOK_KINDS = ("start", "exit", "probe")
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
        p = ("probe", *c)
        self.probe_duration = Histogram("warmexec_probe_duration_seconds", "Scheduled probes, run to result",
                                        ("probe",), registry=r, buckets=DURATION_BUCKETS)
        self.probe_lag = Histogram("warmexec_probe_lag_seconds", "Scheduled probes, planned to started",
                                   registry=r, buckets=SPAWN_BUCKETS)
        self.probe_results = Counter("warmexec_probe_results", "Scheduled probe runs, by result",
                                     (*p, "result"), registry=r)
        self.probe_transitions = Counter("warmexec_probe_transitions",
                                         "Scheduled probes' changes of health, by the new status",
                                         (*p, "to"), registry=r)
        self.probe_skipped = Counter("warmexec_probe_skipped", "Scheduled probe runs not made, by reason",
                                     ("probe", "reason"), registry=r)
        self._table: Callable[[], Iterable[Served]] = lambda: ()
        self._probes: Callable[[], Iterable[tuple[str, str, bool | None, str]]] = lambda: ()
        r.register(_LiveCollector(self))
        r.register(_ProbeCollector(self))
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

    def watch_probes(self, rows: Callable[[], Iterable[tuple[str, str, bool | None, str]]]) -> None:
        """Give the scrape-time probe gauges the scheduler's (probe, container, last ok, status)."""
        self._probes = rows

    # ---- scheduled probes (the loop) -----------------------------------------------
    def probe_result(self, probe: str, container: str, result: str, seconds: float, lag: float) -> None:
        self.probe_results.labels(probe, *self._c(container), result).inc()
        self.probe_duration.labels(probe).observe(seconds)
        self.probe_lag.observe(lag)

    def probe_transition(self, probe: str, container: str, to: str) -> None:
        self.probe_transitions.labels(probe, *self._c(container), to).inc()

    def probe_skip(self, probe: str, reason: str) -> None:
        self.probe_skipped.labels(probe, reason).inc()

    def forget_probe(self, probe: str, container: str) -> None:
        if self.container_label:
            for metric in (self.probe_results, self.probe_transitions):
                for labels in [k for k in list(metric._metrics) if k[:2] == (probe, container)]:
                    metric.remove(*labels)

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


class _ProbeCollector:
    """warmexec_probe_success and warmexec_probe_healthy, read from the scheduler."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for _ in range(3):  # the loop thread may change the probes mid-scrape: retry
            try:
                rows = list(self.metrics._probes())
                break
            except RuntimeError:
                continue
        else:
            return
        labels = ["probe", "container", "pod", "namespace"] if self.metrics.container_label else ["probe"]
        success = GaugeMetricFamily("warmexec_probe_success",
                                    "Whether a scheduled probe's last run succeeded (absent before one)",
                                    labels=labels)
        healthy = GaugeMetricFamily("warmexec_probe_healthy",
                                    "Whether a scheduled probe's container is healthy by its thresholds "
                                    "(absent while unknown)", labels=labels)
        for probe, container, last_ok, status in rows:
            values = [probe, *self.metrics._c(container)]
            if last_ok is not None:
                success.add_metric(values, 1 if last_ok else 0)
            if status != "unknown":
                healthy.add_metric(values, 1 if status == "healthy" else 0)
        yield success
        yield healthy
