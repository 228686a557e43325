"""Scheduled probes: each ``[[probes]]`` entry run in every container it selects.

The scheduler lives on the supervisor's loop. Every SYNC_INTERVAL it matches the
probes' selectors against the served containers (names and annotations may come later
than the container: Docker's names thread), making one ``Probe`` per (probe, container)
pair and dropping those whose container went away. Each pair has one timer on the
loop: its runs are planned on a fixed grid, ``period`` apart, offset within the period
by a hash of the pair (probestate.py), so starts are spread and never drift. A run is
an ``exec`` submitted to the exec path as any client's is (counted, held to the
in-flight limits); its reply comes back through ``Supervisor.reply``, whose envelope
starts with ``SCHEDULED``.

A run is not made, and is counted in ``warmexec_probe_skipped_total{reason}``, when the
pair's previous run is still going (never two at once: a probe outlasting its period
skips ticks), when ``max_probes_inflight`` scheduled runs are already in flight (the
budget that keeps client execs their room), or when the exec path answers ``BUSY``.
Results feed the thresholds (probestate.Health); a change of health is counted, emitted
as ``probe.changed`` and, with a ``hook``, runs the hook with the probe's JSON on stdin.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import errors
from ..protocol.errors import WarmexecError
from ..protocol.messages import ExecRequest
from .hooks import Hooks
from .lifecycle import Emit
from .loop import Loop, Timer
from .metrics import Metrics
from .probeconfig import ProbeSpec, docker_spec, succeeded
from .probestate import ERROR, FAILURE, SUCCESS, TIMEOUT, Health, first_run, next_run, selects
from .workers import WorkerTable

SYNC_INTERVAL = 1.0  # seconds between matches of the selectors against the containers
OUTPUT_KEPT = 256  # bytes of a run's output kept for `warmexec probes`, events and hooks
#: Error replies that are no result: no room now, or the container is going away.
NOT_A_RESULT = {errors.BUSY: "busy", errors.CONTAINER_EXITED: "gone", errors.NO_SUCH_CONTAINER: "gone",
                errors.SHUTTING_DOWN: "gone"}


class _Scheduled(bytes):
    """The type of SCHEDULED: no frame received from a socket is ever this object."""


#: First in the envelope of a scheduled probe's exec: its reply comes to the scheduler.
SCHEDULED = _Scheduled(b"")

Submit = Callable[[list[bytes], Any, ExecRequest], None]


@dataclass(eq=False)
class Probe:
    """One probe in one container."""

    spec: ProbeSpec
    cid: str
    health: Health
    planned: float  # monotonic time of the next (or current) planned run
    seen_at: float = 0.0  # monotonic time the container was first seen (the start period's start)
    timer: Timer | None = None
    running: int | None = None  # the request id of the run in flight
    started: float = 0.0
    lag: float = 0.0
    last: dict = field(default_factory=dict)  # the last result: result, exit_code, output, ...
    runs: int = 0
    changed_at: float | None = None  # wall time of the last change of health


class Scheduler:
    def __init__(self, loop: Loop, specs: tuple[ProbeSpec, ...], table: WorkerTable, submit: Submit,
                 metrics: Metrics | None, emit: Emit, hooks: Hooks, budget: int,
                 docker_healthchecks: bool = False) -> None:
        self.loop, self.specs, self.table, self.submit = loop, specs, table, submit
        self.metrics, self.emit, self.hooks, self.budget = metrics, emit, hooks, budget
        self.probes: dict[tuple[str, str], Probe] = {}
        self.by_request: dict[int, Probe] = {}
        self.ids = itertools.count(1)
        self.inflight = 0
        self.docker_healthchecks = docker_healthchecks
        self.stopped = False
        self._sync_timer: Timer | None = None
        if metrics is not None:
            metrics.watch_probes(self.gauges)

    def start(self) -> None:
        if self.specs or self.docker_healthchecks:
            self._sync()

    def stop(self) -> None:
        """No more runs (the supervisor is stopping); those in flight finish."""
        self.stopped = True
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        for p in self.probes.values():
            if p.timer is not None:
                p.timer.cancel()

    # ---- which probes run where ------------------------------------------------------
    def _sync(self) -> None:
        now = time.monotonic()
        present = set()
        for cid, c in list(self.table.containers.items()):
            names = self.table.names.known_as(cid)
            for spec in self.specs:
                if selects(spec.containers, spec.annotations, names, c.info.labels):
                    present.add((spec.name, cid))
                    if (spec.name, cid) not in self.probes:
                        self._add(spec, cid, now)
            docker = self.table.names.docker.get(cid) if self.docker_healthchecks else None
            if docker is not None and docker.health is not None:
                spec = docker_spec(docker.health)
                present.add((spec.name, cid))
                if (spec.name, cid) not in self.probes:
                    self._add(spec, cid, now)
        for key in [k for k in self.probes if k not in present]:
            self._drop(self.probes.pop(key))
        self._sync_timer = self.loop.call_at(now + SYNC_INTERVAL, self._sync)

    def _add(self, spec: ProbeSpec, cid: str, now: float) -> None:
        p = Probe(spec, cid, Health(spec.success_threshold, spec.failure_threshold),
                  first_run(now, spec.initial_delay, spec.name, cid, spec.period), seen_at=now)
        self.probes[(spec.name, cid)] = p
        p.timer = self.loop.call_at(p.planned, lambda: self._tick(p))

    def _drop(self, p: Probe) -> None:
        if p.timer is not None:
            p.timer.cancel()
        if self.metrics is not None:
            self.metrics.forget_probe(p.spec.name, p.cid)

    # ---- runs -----------------------------------------------------------------------
    def _tick(self, p: Probe) -> None:
        if self.stopped or self.probes.get((p.spec.name, p.cid)) is not p:
            return
        now = time.monotonic()
        lag, p.planned = now - p.planned, next_run(p.planned, p.spec.period, now)
        p.timer = self.loop.call_at(p.planned, lambda: self._tick(p))
        if p.running is not None:
            return self._skip(p, "running")
        if self.inflight >= self.budget:
            return self._skip(p, "budget")
        req_id = next(self.ids)
        p.running, p.started, p.lag = req_id, now, lag
        self.by_request[req_id] = p
        self.inflight += 1
        m = p.spec.module
        req = ExecRequest(p.cid, list(m.argv), user=m.user, timeout=m.timeout, capture=m.capture)
        try:
            self.submit([SCHEDULED], req_id, req)
        except WarmexecError as exc:
            self.on_reply({"id": req_id, "ok": False, "error": {"code": exc.code, "message": exc.message}})

    def _skip(self, p: Probe, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.probe_skip(p.spec.name, reason)

    def on_reply(self, msg: dict) -> None:
        """A scheduled run's reply, from Supervisor.reply."""
        p = self.by_request.pop(msg.get("id"), None)
        if p is None:
            return
        self.inflight -= 1
        p.running = None
        if self.probes.get((p.spec.name, p.cid)) is not p:
            return  # its container went away, or stopped matching
        error = None if msg.get("ok") else msg["error"]
        if error is not None and error["code"] in NOT_A_RESULT:
            return self._skip(p, NOT_A_RESULT[error["code"]])
        took = time.monotonic() - p.started
        if error is not None:
            result = ERROR
        elif msg.get("timed_out"):
            result = TIMEOUT
        else:
            result = SUCCESS if succeeded(p.spec.module, msg) else FAILURE
        output = (msg.get("stdout") or b"") + (msg.get("stderr") or b"") if error is None else b""
        p.runs += 1
        p.last = {"result": result, "exit_code": msg.get("exit_code"), "duration": took, "time": time.time(),
                  "error": error, "output": output[:OUTPUT_KEPT].decode(errors="replace")}
        if self.metrics is not None:
            self.metrics.probe_result(p.spec.name, p.cid, result, took, p.lag)
        if result != SUCCESS and time.monotonic() < p.seen_at + p.spec.start_period:
            return  # docker's start period: a failure is shown, not counted
        previous = p.health.status
        change = p.health.record(result == SUCCESS)
        if change is not None:
            self._changed(p, previous, change)

    def _changed(self, p: Probe, previous: str, status: str) -> None:
        p.changed_at = time.time()
        if self.metrics is not None:
            self.metrics.probe_transition(p.spec.name, p.cid, status)
        pod, namespace = self._pod(p.cid)
        doc = {"probe": p.spec.name, "container": p.cid, "name": self.table.names.name(p.cid), "pod": pod,
               "namespace": namespace, "status": status, "previous": previous, "streak": p.health.streak,
               "last": p.last}
        self.emit("probe.changed", **doc)
        if p.spec.hook:
            self.hooks.run("probe", {"command": list(p.spec.hook), "timeout": p.spec.hook_timeout},
                           {"event": "probe.changed", **doc, "argv": list(p.spec.module.argv)})

    # ---- what is seen of them ---------------------------------------------------------
    def row(self, p: Probe) -> dict:
        return {"probe": p.spec.name, "container": p.cid, "name": self.table.names.name(p.cid),
                "status": p.health.status, "streak": p.health.streak, "runs": p.runs,
                "running": p.running is not None, "period": p.spec.period,
                "next_in": max(0.0, p.planned - time.monotonic()), "changed_at": p.changed_at,
                "last": p.last or None}

    def _pod(self, cid: str) -> tuple[str | None, str | None]:
        c = self.table.containers.get(cid)
        return c.info.kubernetes() if c is not None else (None, None)

    def describe(self) -> list[dict]:
        return [self.row(p) for p in self.probes.values()]

    def gauges(self) -> list[tuple[str, str, bool | None, str]]:
        """(probe, container, last run succeeded, status): read at scrape time."""
        return [(p.spec.name, p.cid, (p.last["result"] == SUCCESS) if p.last else None, p.health.status)
                for p in list(self.probes.values())]
