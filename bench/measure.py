"""Latency and throughput of `true`: warmexec, runc exec, nsenter and the floor.

Each method runs ``true`` in the same containers, round-robin:

* warmexec  - ``Client.exec`` round trip (ZeroMQ, supervisor, warm worker);
* runc exec - ``runc --root ROOT exec CID true``, a subprocess per exec;
* nsenter   - ``nsenter -t INITPID -a true`` (namespaces only: it does not join
  the container's cgroups, so it does less than the others);
* floor     - posix_spawn + waitpid of /bin/true from a process already inside the
  container (see :mod:`bench.floor`): what no exec mechanism can beat;
* zmq ping  - warmexec's ``ping`` request: the ZeroMQ round trip alone (client and
  supervisor, their I/O threads), no exec; what any ZeroMQ client pays on top of an exec.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bench.common import BenchError, Counts, Failures, percentile
from bench.runcbox import RuncBox
from warmexec.protocol.client import Client
from warmexec.protocol.errors import UNREACHABLE, WarmexecError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("warmexec", "runc exec", "nsenter", "floor", "zmq ping")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
WARMEXEC_INFLIGHT = (1, 8, 32, 128)
FLOOR_PARALLEL = (1, os.cpu_count() or 1)  # spawn+wait loops running side by side
RUNC_INFLIGHT = (1, 8)
RUNC_INFLIGHT_FULL = (1, 8, 32)
RUNC_POINT_BUDGET = 60.0  # seconds: a runc exec point predicted to take longer is skipped
REPLY_TIMEOUT = 30.0  # seconds: an exec not answered by then is a failure, not a hung bench


# ---- one exec --------------------------------------------------------------------

def warmexec_once(client: Client, cid: str, failures: Failures) -> None:
    """One exec through warmexec (what Client.exec does, with a deadline on the reply)."""
    collect(client, client.submit("exec", container=cid, argv=["true"]), cid, failures)


def collect(client: Client, req_id: int, cid: str, failures: Failures) -> None:
    """The reply to one exec of `true`: a failure is counted, a dead supervisor ends the
    bench (not one sample)."""
    try:
        reply = client.result(req_id, REPLY_TIMEOUT)
    except WarmexecError as exc:
        if exc.code == UNREACHABLE:
            raise BenchError(f"warmexec: {exc}") from None
        failures.add("warmexec", f"{cid}: {exc}")
        return
    if reply["exit_code"] != 0:
        failures.add("warmexec", f"{cid}: exit code {reply['exit_code']}")


def subprocess_once(method: str, cmd: list[str], failures: Failures) -> None:
    """One exec as a child process, stdio on /dev/null so no pipe is read."""
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL).returncode
    if rc != 0:
        failures.add(method, f"{' '.join(cmd)}: exit code {rc}")


def runc_cmd(box: RuncBox, cid: str) -> list[str]:
    return ["runc", "--root", box.root, "exec", cid, "true"]


# ---- latency ---------------------------------------------------------------------

def timed_loop(cids: list[str], n: int, warmup: int, once: Callable[[str], None]) -> list[int]:
    """warmup untimed, then n timed calls of once(cid), cids round-robin; ns each."""
    for i in range(warmup):
        once(cids[i % len(cids)])
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        once(cids[i % len(cids)])
        samples.append(time.perf_counter_ns() - t0)
    return samples


BATCH = 50  # execs per turn when the floor and warmexec take turns


class FloorProcess:
    """bench.floor --batches joined to one container: timed spawn+wait batches on demand.

    A subprocess, since joining a mount namespace needs a single-threaded process. Its
    own checks (namespaces and cgroups of the spawned children vs the init's) must all
    hold, or the samples would not be of the container at all."""

    def __init__(self, box: RuncBox, cid: str, warmup: int) -> None:
        self.cid = cid
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "--root", box.root, "--container", cid,
             "--warmup", str(warmup), "--batches"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise BenchError(f"bench.floor in {cid} failed: {self.proc.communicate()[1].strip()}")

    def batch(self, n: int) -> list[int]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["samples_ns"]

    def close(self, failures: Failures) -> None:
        out, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise BenchError(f"bench.floor in {self.cid} failed ({self.proc.returncode}): {err.strip()}")
        result = json.loads(out.strip().splitlines()[-1])
        for _ in range(result["failures"]):
            failures.add("floor", f"{self.cid}: /bin/true exited non-zero")
        wrong = [k for k, ok in result["checks"].items() if not ok]
        if wrong:
            raise BenchError(f"bench.floor in {self.cid} is not inside the container: {wrong} differ")


def warmexec_and_floor(box: RuncBox, client: Client, cids: list[str], n: int, warmup: int,
                       failures: Failures) -> tuple[list[int], list[int]]:
    """n samples of each, taking turns BATCH execs at a time, so that a machine that
    drifts faster or slower during the run weighs on both alike. warmexec goes
    round-robin over cids exec by exec; each floor batch runs in the next container."""
    floors: dict[str, FloorProcess] = {}
    try:
        for cid in cids:
            floors[cid] = FloorProcess(box, cid, warmup)
        for i in range(warmup):
            warmexec_once(client, cids[i % len(cids)], failures)
        we: list[int] = []
        floor: list[int] = []
        turn = 0
        while len(we) < n:
            k = min(BATCH, n - len(we))
            floor += floors[cids[turn % len(cids)]].batch(k)
            for _ in range(k):
                cid = cids[len(we) % len(cids)]
                t0 = time.perf_counter_ns()
                warmexec_once(client, cid, failures)
                we.append(time.perf_counter_ns() - t0)
            turn += 1
    finally:
        for f in floors.values():
            f.close(failures)
    return we, floor


def measure_latency(box: RuncBox, client: Client, cids: list[str], c: Counts,
                    failures: Failures) -> dict[str, list[int]]:
    """All methods on the same containers: warmexec and the floor taking turns (the
    ratio the targets are about), then runc exec, nsenter and the bare ZeroMQ round trip."""
    pids = {cid: box.init_pid(cid) for cid in cids}
    nsenter = lambda cid: ["nsenter", "-t", str(pids[cid]), "-a", "true"]
    out: dict[str, list[int]] = {}
    out["warmexec"], out["floor"] = warmexec_and_floor(box, client, cids, c.fast, c.warmup, failures)
    out["runc exec"] = timed_loop(cids, c.slow, c.warmup,
                                  lambda cid: subprocess_once("runc exec", runc_cmd(box, cid), failures))
    out["nsenter"] = timed_loop(cids, c.slow, c.warmup,
                                lambda cid: subprocess_once("nsenter", nsenter(cid), failures))
    out["zmq ping"] = timed_loop(cids, c.fast, c.warmup, lambda _cid: client.ping(REPLY_TIMEOUT))
    return {m: out[m] for m in METHODS}


def summarize(samples: dict[str, list[int]]) -> dict[str, dict]:
    """Percentiles per method and each p50 as a multiple of runc exec's and the floor's."""
    out = {}
    for method, ns in samples.items():
        s = sorted(ns)
        out[method] = {"n": len(s), **{f"p{q:g}_ms": round(percentile(s, q), 3) for q in PERCENTILES},
                       "mean_ms": round(sum(s) / len(s) / 1e6, 3) if s else None}
    for ref, key in (("runc exec", "p50_vs_runc"), ("floor", "p50_vs_floor")):
        base = out.get(ref, {}).get("p50_ms")
        for row in out.values():
            row[key] = round(row["p50_ms"] / base, 4) if base else None
    return out


# ---- throughput ------------------------------------------------------------------

def warmexec_pipelined(client: Client, cids: list[str], k: int, total: int, failures: Failures) -> float:
    """Seconds for total execs with up to k in flight on one client, round-robin.

    Replies are collected oldest first; one that arrives early waits in the client's
    buffer, so for a moment fewer than k may be in flight (execs of `true` finish
    nearly in order, so the effect is small).
    """
    pending: collections.deque[tuple[int, str]] = collections.deque()
    sent = 0
    t0 = time.perf_counter()
    while sent < total or pending:
        while sent < total and len(pending) < k:
            cid = cids[sent % len(cids)]
            pending.append((client.submit("exec", container=cid, argv=["true"]), cid))
            sent += 1
        collect(client, *pending.popleft(), failures)
    return time.perf_counter() - t0


def runc_parallel(box: RuncBox, cids: list[str], k: int, total: int, failures: Failures) -> float:
    """Seconds for total `runc exec`s run by k threads, each waiting on its child."""
    cmds = [runc_cmd(box, cids[i % len(cids)]) for i in range(total)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=k) as pool:
        list(pool.map(lambda cmd: subprocess_once("runc exec", cmd, failures), cmds))
    return time.perf_counter() - t0


def floor_parallel(box: RuncBox, cids: list[str], k: int, total: int,
                   failures: Failures) -> tuple[float, float]:
    """(seconds, CPU seconds) for total spawn+wait of /bin/true by k bench.floor
    processes, each in its own container, started together: what the kernel alone
    allows on these cores, and what it costs (the floors and their commands)."""
    per = [total // k + (i < total % k) for i in range(k)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.floor", "--root", box.root, "--container",
                               cids[i % len(cids)], "-n", str(per[i]), "--warmup", "20", "--barrier"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for i in range(k)]
    try:
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise BenchError(f"bench.floor failed: {proc.stderr.read().strip()}")
        for proc in procs:  # all of them are waiting on stdin: start them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [json.loads(proc.communicate(timeout=600)[0]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r in results:
        for _ in range(r["failures"]):
            failures.add("floor", "/bin/true exited non-zero")
    return max(r["elapsed_ns"] for r in results) / 1e9, sum(r["cpu_s"] for r in results)


def _row(method: str, k: int, execs: int, secs: float, cpu: dict[str, float] | None = None) -> dict:
    """One point; cpu: CPU seconds by part over the point (its total per exec is kept)."""
    row = {"method": method, "inflight": k, "execs": execs, "seconds": round(secs, 4),
           "execs_per_s": round(execs / secs, 1)}
    if cpu is not None:
        row["cpu_ms_per_exec"] = round(sum(cpu.values()) * 1e3 / execs, 3)
        row["cpu_ms_per_exec_by_part"] = {k: round(v * 1e3 / execs, 3) for k, v in cpu.items()}
    return row


def warmexec_point(client: Client, sup_pid: int, cids: list[str], k: int, total: int,
                   failures: Failures) -> dict:
    """A warmexec throughput point, with the CPU of every part spent on it."""
    from bench import resources  # (it imports this module)
    procs = resources.tree(sup_pid)
    before, client0 = resources.cpu_snapshot(procs), resources.self_cpu()
    secs = warmexec_pipelined(client, cids, k, total, failures)
    by_part, _ = resources.cpu_delta(before, resources.cpu_snapshot(procs))
    by_part["client"] = resources.self_cpu() - client0
    return _row("warmexec", k, total, secs, by_part)


def measure_throughput(box: RuncBox, client: Client, sup_pid: int, cids: list[str], c: Counts,
                       quick: bool, failures: Failures) -> list[dict]:
    """Execs/s as concurrency grows: where warmexec's single-threaded supervisor and
    runc's per-exec process start-up each stop scaling on this machine, beside the
    floor's own rate with one spawn+wait loop per CPU (the kernel's ceiling here). A runc exec
    point that the previous point's rate predicts to run over RUNC_POINT_BUDGET is
    left out (listed with "skipped")."""
    rows = [warmexec_point(client, sup_pid, cids, k, c.tput, failures) for k in WARMEXEC_INFLIGHT]
    for k in FLOOR_PARALLEL:
        secs, cpu = floor_parallel(box, cids, k, c.tput, failures)
        rows.append(_row("floor", k, c.tput, secs, {"floor and commands": cpu}))
    rate = None
    for k in RUNC_INFLIGHT if quick else RUNC_INFLIGHT_FULL:
        if rate and c.tput_runc / rate > RUNC_POINT_BUDGET:
            rows.append({"method": "runc exec", "inflight": k, "execs": 0, "skipped": True})
            continue
        rows.append(_row("runc exec", k, c.tput_runc, runc_parallel(box, cids, k, c.tput_runc, failures)))
        rate = rows[-1]["execs_per_s"]
    return rows
