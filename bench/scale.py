"""Many warm containers, and how fast a new one gets warm.

* :func:`measure_scale`: its own supervisor and containers; at each count N (1, 100,
  500) the memory of warmexec's processes, the tree's idle CPU, and exec latency with
  execs round-robin over all N containers. Containers start in parallel (``runc run``
  is a subprocess) and share one read-only rootfs, so 500 start in well under a minute.
* :func:`measure_warmup`: containers started one at a time under a running
  supervisor; from ``runc run -d`` returning to the container listed READY (inotify
  discovery, zygote fork, cgroups, setns, credentials) and to its first exec done.
"""

from __future__ import annotations

import os
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

from bench.common import BenchError, Counts, Failures, pcts, ratio, start_supervisor
from bench.measure import timed_loop, warmexec_once, warmexec_pipelined
from bench.resources import idle_cpu, measure_memory
from bench.runcbox import RuncBox
from warmexec.protocol.client import Client

START_THREADS = 4  # runc run is mostly CPU: more threads than cores only add contention
PER_CONTAINER_MIB = 16  # generous: busybox init, worker(s), kernel objects
HEADROOM_MIB = 1024
FDS_PER_CONTAINER = 8  # supervisor: init pidfd, worker socket(s), freezer files
WARM_INFLIGHT = 16  # execs in flight for each new container's first exec
POLL = 0.002


# ---- many containers -------------------------------------------------------------

def plan(counts: tuple[int, ...]) -> tuple[tuple[int, ...], list[str]]:
    """The counts this machine has room for (memory, pids); raises our fd limit (the
    supervisor inherits it) if the largest count needs it. Notes say what changed."""
    notes = []
    with open("/proc/meminfo") as f:
        avail = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) // 1024
    room = (avail - HEADROOM_MIB) // PER_CONTAINER_MIB
    with open("/proc/sys/kernel/pid_max") as f:
        room = min(room, (int(f.read()) - 2000) // 4)
    fitting = tuple(n for n in counts if n <= room)
    if fitting != counts:
        notes.append(f"memory {avail} MiB available: container counts cut to {fitting}")
    need = max(fitting, default=0) * FDS_PER_CONTAINER + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        notes.append(f"RLIMIT_NOFILE raised from {soft} to {new} for the supervisor")
    return fitting, notes


def start_many(box: RuncBox, names: list[str]) -> list[str]:
    """Start containers in parallel; all of them, or BenchError. One whose start failed
    half-way is still under box.root, where :func:`delete_all` finds it."""
    pool = ThreadPoolExecutor(START_THREADS)
    try:
        futures = [pool.submit(box.run, name, shared_rootfs=True) for name in names]
        wait(futures)
    finally:  # interrupted: no new starts, and those running finish before clean-up
        pool.shutdown(wait=True, cancel_futures=True)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise BenchError(f"{len(failed)} of {len(names)} containers failed to start: {failed[0]}")
    return [f.result() for f in futures]


def delete_all(box: RuncBox) -> None:
    """Delete every container of the box in parallel (what box.cleanup does one by one)."""
    cids = sorted(set(box.ids) | set(box.listed()))
    with ThreadPoolExecutor(START_THREADS) as pool:
        list(pool.map(box.delete, cids))


def wait_all_ready(client: Client, cids: list[str], timeout: float) -> None:
    want = set(cids)
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["id"]: r for r in client.list() if r["id"] in want}
        if len(rows) == len(want) and all(r["state"] == "READY" for r in rows.values()):
            return
        if time.monotonic() > deadline:
            late = {c: rows[c]["state"] if c in rows else "unknown" for c in want
                    if c not in rows or rows[c]["state"] != "READY"}
            raise BenchError(f"{len(late)} of {len(want)} workers not READY after {timeout:.0f}s: "
                             f"{dict(list(late.items())[:5])}")
        time.sleep(0.05)


def grow(box: RuncBox, client: Client, cids: list[str], n: int, failures: Failures) -> dict:
    """Start containers up to n in all, wait for every worker, run one exec in each new
    container (whatever a first exec warms); seconds of each step."""
    t0 = time.monotonic()
    new = start_many(box, [f"scale{i}" for i in range(len(cids), n)])
    started = time.monotonic() - t0
    cids += new
    wait_all_ready(client, cids, 60 + 0.2 * n)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    warmexec_pipelined(client, new, WARM_INFLIGHT, len(new), failures)
    return {"containers": n, "start_s": round(started, 2), "all_ready_s": round(ready, 2),
            "first_execs_s": round(time.monotonic() - t1, 2)}


def scale_point(client: Client, sup_pid: int, cids: list[str], c: Counts, failures: Failures) -> dict:
    """Memory, idle CPU, then latency with execs round-robin over every container (each
    exec wakes a worker whose memory has left the CPU caches), and into the first
    container alone while the others stay warm (what the supervisor's own size costs)."""
    row = {"memory": measure_memory(client, sup_pid), "idle": idle_cpu(sup_pid, c.idle_seconds)}
    once = lambda cid: warmexec_once(client, cid, failures)
    for key, targets in (("latency", cids), ("latency_one", cids[:1])):
        samples = timed_loop(targets, c.scale_execs, min(20, c.scale_execs), once)
        row[key] = {"n": len(samples), **pcts(samples, (50.0, 90.0, 99.0))}
    return row


def measure_scale(box: RuncBox, workdir: str, c: Counts, failures: Failures) -> dict:
    """Its own supervisor on box's root; box's containers are the caller's to delete."""
    counts, notes = plan(c.scale)
    sup = start_supervisor(box.root, workdir)
    client = Client(sup.endpoint)
    rows: list[dict] = []
    cids: list[str] = []
    try:
        for n in counts:
            rows.append(grow(box, client, cids, n, failures))
            rows[-1].update(scale_point(client, sup.proc.pid, cids, c, failures))
    finally:
        client.close()
        status = sup.stop()
    for key in ("latency", "latency_one"):
        base = rows[0][key]["p50_ms"] if rows else None
        for row in rows:
            row[key]["p50_vs_first"] = ratio(row[key]["p50_ms"], base)
    return {"points": rows, "notes": notes, "supervisor_exit": status}


# ---- warm-up of one new container ------------------------------------------------

def poll_ready(client: Client, cid: str, starting: Future, timeout: float = 30.0) -> int:
    """Poll the list every POLL seconds while ``runc run`` (starting) runs and after;
    the monotonic ns cid was first seen READY."""
    deadline = time.monotonic() + timeout
    while True:
        if any(r["id"] == cid and r["state"] == "READY" for r in client.list()):
            return time.monotonic_ns()
        if starting.done() and starting.exception() is not None:
            raise BenchError(f"{cid}: runc run failed: {starting.exception()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{cid}: no READY worker after {timeout}s")
        time.sleep(POLL)


def warm_one(box: RuncBox, client: Client, name: str, failures: Failures) -> dict[str, int]:
    """One container, ns: runc run -d runs in a thread while the list is polled, since
    the supervisor may see the state (and make the worker) before runc returns."""
    returned: list[int] = []

    def run() -> str:
        cid = box.run(name, shared_rootfs=True)
        returned.append(time.monotonic_ns())
        return cid

    with ThreadPoolExecutor(1) as pool:
        t_run = time.monotonic_ns()
        starting = pool.submit(run)
        ready = poll_ready(client, box.prefix + name, starting)
        ready_wall = time.time_ns() - (time.monotonic_ns() - ready)
        cid = starting.result()
    written = os.stat(os.path.join(box.root, cid, "state.json")).st_mtime_ns
    t0 = max(ready, returned[0])  # an exec is only sent once runc run has returned
    warmexec_once(client, cid, failures)
    done = time.monotonic_ns()
    return {"state_to_ready": ready_wall - written, "run_to_ready": ready - t_run,
            "wait_after_run": max(0, ready - returned[0]), "first_exec": done - t0,
            "run_returned_to_exec_done": done - returned[0], "runc_run": returned[0] - t_run}


def measure_warmup(box: RuncBox, client: Client, n: int, failures: Failures) -> dict:
    rows = [warm_one(box, client, f"warm{i}", failures) for i in range(n)]
    return {"n": n, **{key: pcts([r[key] for r in rows]) for key in rows[0]}} if rows else {"n": 0}
