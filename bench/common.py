"""What the bench's parts share: run sizes, failures, errors, percentiles."""

from __future__ import annotations

import collections
import dataclasses
import os

from bench.harness import SupervisorProcess

MAX_ERRORS_KEPT = 20


class BenchError(Exception):
    """The bench itself cannot go on (set-up failed, supervisor gone)."""


@dataclasses.dataclass
class Counts:
    """How many execs and containers each part uses; --quick shrinks them all."""

    fast: int  # latency samples: warmexec, floor
    slow: int  # latency samples: runc exec, nsenter
    warmup: int  # untimed execs per method before measuring
    tput: int  # execs per warmexec throughput point
    tput_runc: int  # execs per runc exec throughput point
    cpu: int  # sequential execs whose CPU is counted: warmexec
    cpu_runc: int  # the same for runc exec
    scale: tuple[int, ...]  # warm container counts for memory and latency at scale
    scale_execs: int  # latency samples at each container count
    idle_seconds: float  # supervisor tree's idle CPU is sampled this long at each count
    warm_containers: int  # containers started one by one to time their warm-up
    engine_fast: int  # warmexec execs on the Docker container (latency and CPU)
    engine_slow: int  # the same for docker exec and ctr exec each (0: no engine part)
    cri: int  # CRI ExecSyncs through warmexec cri and containerd each (0: no CRI part)
    stream_mib: int = 256  # MiB through each way of a streamed exec (0: no stream part)
    stream_runs: int = 5  # runs of each way; the median is reported


FULL = Counts(2000, 300, 20, 3000, 240, 2000, 200, (1, 100, 500), 500, 4.0, 20, 1000, 200, 300)
QUICK = Counts(200, 30, 10, 300, 24, 500, 30, (1, 20), 200, 1.0, 5, 200, 20, 20, 16, 3)


class Failures:
    """Failed execs across the whole run: counted all, the first few kept verbatim."""

    def __init__(self) -> None:
        self.count: dict[str, int] = collections.Counter()
        self.examples: list[str] = []

    def add(self, method: str, what: str) -> None:
        self.count[method] += 1
        if len(self.examples) < MAX_ERRORS_KEPT:
            self.examples.append(f"{method}: {what}")

    def total(self) -> int:
        return sum(self.count.values())


def start_supervisor(root: str, workdir: str, config: str = "") -> SupervisorProcess:
    """`warmexec serve` on one runc root, quiet (WARNING). Metrics are recorded as always;
    only their HTTP endpoint is left off, as nothing scrapes it here."""
    os.makedirs(workdir, exist_ok=True)
    try:
        return SupervisorProcess(root, workdir, config=config, metrics=False, log_level="WARNING")
    except AssertionError as exc:
        raise BenchError(str(exc)) from None


def percentile(sorted_ns: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), in ms."""
    if not sorted_ns:
        return float("nan")
    pos = (len(sorted_ns) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ns) - 1)
    return (sorted_ns[lo] + (sorted_ns[hi] - sorted_ns[lo]) * (pos - lo)) / 1e6


def pcts(ns: list[int], qs: tuple[float, ...] = (50.0, 95.0)) -> dict[str, float]:
    """{"p50_ms": .., "p95_ms": ..} of samples in ns, rounded to the microsecond."""
    s = sorted(ns)
    return {f"p{q:g}_ms": round(percentile(s, q), 3) for q in qs}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return round(a / b, digits) if a is not None and b else None
