"""``warmexec cri``'s own metrics: which way each ExecSync went and why, and how long it took.

The proxy is a process of its own with a registry of its own, served on its own
``--metrics-addr`` by the same bounded endpoint as the supervisor's
(:class:`~warmexec.supervisor.httpserver.MetricsServer`); the supervisor's metrics stay the
supervisor's. Labels are bounded: ``path`` is ``warm`` or ``upstream``, ``reason`` one
of REASONS (never an id or a command).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("warmexec")

WARM, UPSTREAM = "warm", "upstream"
REASONS = {
    WARM: ("served",              # answered from the warm worker with the command's exit code
           "timed_out",           # killed at its timeout, answered as the runtime answers that
           "too_large",           # a reply the runtime's gRPC server would refuse to send
           "lost"),               # warmexec lost it after it may have run: an error, never run twice
    UPSTREAM: ("not_cri_container",   # the supervisor serves it, but as a pod's sandbox or not a CRI one
               "unknown_container",   # the supervisor does not serve it
               "not_ready",           # served, but its worker is not READY yet
               "supervisor_unreachable",
               "empty_cmd",
               "undecodable",         # a request warmexec cannot read: the runtime says why
               "cannot_start",        # nothing ran (missing or non-executable command): the runtime's words
               "refused"),            # the supervisor refused before starting it (busy, paused, gone...)
}
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class CriMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.execsyncs = Counter("warmexec_cri_execsync", "ExecSync calls, by the way they went and why",
                                 ("path", "reason"), registry=self.registry)
        self.duration = Histogram("warmexec_cri_execsync_duration_seconds",
                                  "ExecSync received to answered, by the way it went", ("path",),
                                  buckets=BUCKETS, registry=self.registry)
        self.upstream = Gauge("warmexec_cri_upstream_info", "The runtime behind the proxy (1) and whose "
                              "answers warmexec gives", ("kind",), registry=self.registry)
        # Every series exists from the start (rate() sees the first call), each child looked
        # up once: labels() per call was a measurable part of the fast path's CPU.
        self.children = {(path, reason): (self.execsyncs.labels(path, reason), self.duration.labels(path))
                         for path, reasons in REASONS.items() for reason in reasons}

    def execsync(self, path: str, reason: str, seconds: float, cid: str) -> None:
        count, duration = self.children[path, reason]
        count.inc()
        duration.observe(seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ExecSync %s: %s (%s) in %.2f ms", cid[:64], path, reason, seconds * 1000)

    def upstream_kind(self, kind: str) -> None:
        self.upstream.clear()
        self.upstream.labels(kind).set(1)
