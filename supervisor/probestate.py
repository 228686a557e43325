"""A scheduled probe's health and timing, as pure logic (the scheduler applies it).

Health follows the kubelet's thresholds: a probe's status changes only once the same
result has come ``threshold`` times in a row (``success_threshold`` successes to become
healthy, ``failure_threshold`` failures to become unhealthy). It starts ``unknown``
(neither healthy nor unhealthy: nothing is exported as healthy or unhealthy, no alert
fires) until one threshold is first reached. A run that could not be made for want of
room (the scheduler's budget, the supervisor's in-flight limits, the previous run
still going) is no result at all and leaves the count where it was.

Start times are spread over the period, as the kubelet jitters each probe's first run:
each (probe, container) pair gets a fixed offset in [0, period) from a hash of the two
names, so 500 containers probed every second start about 2 ms apart instead of all at
once, and keep that spacing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from fnmatch import fnmatchcase

UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"
SUCCESS, FAILURE, TIMEOUT, ERROR = "success", "failure", "timeout", "error"  # results of a run


@dataclass
class Health:
    success_threshold: int
    failure_threshold: int
    status: str = UNKNOWN
    streak: int = 0  # how many of the last results were `last`
    last: bool | None = None

    def record(self, ok: bool) -> str | None:
        """Count one result; the new status if this one changed it, else None."""
        if ok is self.last:
            self.streak += 1
        else:
            self.last, self.streak = ok, 1
        target = HEALTHY if ok else UNHEALTHY
        needed = self.success_threshold if ok else self.failure_threshold
        if self.status != target and self.streak >= needed:
            self.status = target
            return target
        return None


def offset(probe: str, container: str, period: float) -> float:
    """Where in its period this pair's runs fall: fixed, spread, in [0, period)."""
    return zlib.crc32(f"{probe}\0{container}".encode()) / 2**32 * period


def first_run(seen_at: float, initial_delay: float, probe: str, container: str, period: float) -> float:
    """The first run: the initial delay after the container was first seen, then its
    offset (so no run starts before the initial delay has passed)."""
    return seen_at + initial_delay + offset(probe, container, period)


def next_run(planned: float, period: float, now: float) -> float:
    """The next planned time after now, on the probe's grid: ticks missed while the
    loop was busy are skipped, not run in a burst."""
    nxt = planned + period
    if nxt <= now:
        nxt += ((now - nxt) // period + 1) * period
    return nxt


def selects(containers: tuple[str, ...], annotations: tuple[tuple[str, str], ...],
            names: list[str], labels: dict[str, str]) -> bool:
    """A probe's selector against a container: one of its names (id, Docker name,
    aliases) matches one of the globs, and each annotation it names matches its glob."""
    if not any(fnmatchcase(n, g) for n in names for g in containers):
        return False
    return all(k in labels and fnmatchcase(str(labels[k]), g) for k, g in annotations)
