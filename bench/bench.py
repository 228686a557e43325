"""Exec latency and throughput of warmexec against runc exec, nsenter and the floor.

    python3 -m bench.bench [--quick] [-n N] [--n-slow M] [--containers K] [--json PATH]

One run, one set of busybox containers (under a private runc root, see
:mod:`bench.runcbox`), one ``warmexec serve`` subprocess. Each method runs ``true``
in those containers, round-robin, one exec at a time:

* warmexec  - ``Client.exec`` round trip (ZeroMQ, supervisor, warm spawner);
* runc exec - ``runc --root ROOT exec CID true``, a subprocess per exec;
* nsenter   - ``nsenter -t INITPID -a true`` (namespaces only: it does not join
  the container's cgroups, so it does less than the others);
* floor     - posix_spawn + waitpid of /bin/true from a process already inside the
  container (see :mod:`bench.floor`): what no exec mechanism can beat.

Then throughput: warmexec with 1, 8 and 32 requests in flight, runc exec with 1 and 8
parallel subprocesses. Prints percentiles, ratios and throughput, writes everything
(raw samples and machine info included) as JSON. Exits 1 if any exec failed. Timings
are reported, never asserted: a shared 2-core VM is noisy.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from warmexec.protocol.client import Client
from warmexec.protocol.errors import UNREACHABLE, WarmexecError

from bench.harness import SupervisorProcess, wait_ready
from bench.runcbox import RuncBox

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "out", "results.json")
METHODS = ("warmexec", "runc exec", "nsenter", "floor")
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
WARMEXEC_INFLIGHT = (1, 8, 32)
RUNC_INFLIGHT = (1, 8)
READY_TIMEOUT = 30.0
MAX_ERRORS_KEPT = 20


class BenchError(Exception):
    """The bench itself cannot go on (set-up failed, supervisor gone)."""


@dataclasses.dataclass
class Counts:
    """How many execs each part runs; --quick shrinks them all."""

    fast: int  # latency samples: warmexec, floor
    slow: int  # latency samples: runc exec, nsenter
    warmup: int  # untimed execs per method before measuring
    tput: int  # execs per warmexec throughput point
    tput_runc: int  # execs per runc exec throughput point


def counts_from(args: argparse.Namespace) -> Counts:
    """Defaults, then --quick, then explicit -n / --n-slow win."""
    c = Counts(200, 30, 10, 300, 24) if args.quick else Counts(2000, 300, 20, 3000, 240)
    if args.n is not None:
        c.fast = args.n
        c.slow = min(c.slow, args.n)
    if args.n_slow is not None:
        c.slow = args.n_slow
    c.warmup = max(c.warmup, 2 * args.containers)  # every container's spawner warmed twice
    return c


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


# ---- statistics ------------------------------------------------------------------

def percentile(sorted_ns: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), in ms."""
    if not sorted_ns:
        return float("nan")
    pos = (len(sorted_ns) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ns) - 1)
    return (sorted_ns[lo] + (sorted_ns[hi] - sorted_ns[lo]) * (pos - lo)) / 1e6


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


# ---- machine ---------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    """x86 says "model name"; other architectures use other keys."""
    try:
        with open("/proc/cpuinfo") as f:
            rows = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in reversed(rows)}
    return next((fields[k] for k in ("model name", "Hardware", "cpu model", "uarch") if k in fields), None)


def machine_info() -> dict:
    """What a reader needs to compare two result files."""
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(), "kernel": platform.release(), "arch": platform.machine(),
        "python": platform.python_version(), "runc": _first_line(["runc", "--version"]),
        "nsenter": _first_line(["nsenter", "--version"]), "loadavg_start": os.getloadavg(),
    }


# ---- latency ---------------------------------------------------------------------

def warmexec_once(client: Client, cid: str, failures: Failures) -> None:
    """One exec through warmexec; a dead supervisor ends the bench, not one sample."""
    try:
        reply = client.exec(cid, ["true"])
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


def floor_latency(box: RuncBox, cids: list[str], n: int, warmup: int, failures: Failures) -> list[int]:
    """bench.floor in each container in turn, n split between them.

    A subprocess, since joining a mount namespace needs a single-threaded process.
    Its own checks (namespaces and cgroups of the spawned children vs the init's)
    must all hold, or the samples would not be of the container at all.
    """
    samples: list[int] = []
    per = [n // len(cids) + (i < n % len(cids)) for i in range(len(cids))]
    for cid, count in zip(cids, per):
        cmd = [sys.executable, "-m", "bench.floor", "--root", box.root, "--container", cid,
               "-n", str(count), "--warmup", str(warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
        if proc.returncode != 0:
            raise BenchError(f"bench.floor in {cid} failed ({proc.returncode}): {proc.stderr.strip()}")
        result = json.loads(proc.stdout)
        for _ in range(result["failures"]):
            failures.add("floor", f"{cid}: /bin/true exited non-zero")
        wrong = [k for k, ok in result["checks"].items() if not ok]
        if wrong:
            raise BenchError(f"bench.floor in {cid} is not inside the container: {wrong} differ")
        samples += result["samples_ns"]
    return samples


def measure_latency(box: RuncBox, client: Client, cids: list[str], c: Counts,
                    failures: Failures) -> dict[str, list[int]]:
    """All four methods, one after the other, on the same containers. Floor first:
    it needs no supervisor, and it is the reference the others are read against."""
    pids = {cid: box.init_pid(cid) for cid in cids}
    runc = lambda cid: ["runc", "--root", box.root, "exec", cid, "true"]
    nsenter = lambda cid: ["nsenter", "-t", str(pids[cid]), "-a", "true"]
    out = {"floor": floor_latency(box, cids, c.fast, c.warmup, failures)}
    out["warmexec"] = timed_loop(cids, c.fast, c.warmup, lambda cid: warmexec_once(client, cid, failures))
    out["runc exec"] = timed_loop(cids, c.slow, c.warmup,
                                  lambda cid: subprocess_once("runc exec", runc(cid), failures))
    out["nsenter"] = timed_loop(cids, c.slow, c.warmup,
                                lambda cid: subprocess_once("nsenter", nsenter(cid), failures))
    return {m: out[m] for m in METHODS}


# ---- throughput ------------------------------------------------------------------

def warmexec_throughput(client: Client, cids: list[str], k: int, total: int, failures: Failures) -> float:
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
        req_id, cid = pending.popleft()
        try:
            reply = client.result(req_id)
        except WarmexecError as exc:
            if exc.code == UNREACHABLE:
                raise BenchError(f"warmexec: {exc}") from None
            failures.add("warmexec", f"{cid}: {exc}")
            continue
        if reply["exit_code"] != 0:
            failures.add("warmexec", f"{cid}: exit code {reply['exit_code']}")
    return time.perf_counter() - t0


def runc_throughput(box: RuncBox, cids: list[str], k: int, total: int, failures: Failures) -> float:
    """Seconds for total `runc exec`s run by k threads, each waiting on its child."""
    cmds = [["runc", "--root", box.root, "exec", cids[i % len(cids)], "true"] for i in range(total)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=k) as pool:
        list(pool.map(lambda cmd: subprocess_once("runc exec", cmd, failures), cmds))
    return time.perf_counter() - t0


def measure_throughput(box: RuncBox, client: Client, cids: list[str], c: Counts,
                       failures: Failures) -> list[dict]:
    """Execs/s as concurrency grows: where warmexec's single-threaded supervisor and
    runc's per-exec process start-up each stop scaling on this machine."""
    rows = []
    for k in WARMEXEC_INFLIGHT:
        secs = warmexec_throughput(client, cids, k, c.tput, failures)
        rows.append({"method": "warmexec", "inflight": k, "execs": c.tput, "seconds": round(secs, 4),
                     "execs_per_s": round(c.tput / secs, 1)})
    for k in RUNC_INFLIGHT:
        secs = runc_throughput(box, cids, k, c.tput_runc, failures)
        rows.append({"method": "runc exec", "inflight": k, "execs": c.tput_runc,
                     "seconds": round(secs, 4), "execs_per_s": round(c.tput_runc / secs, 1)})
    return rows


# ---- output ----------------------------------------------------------------------

def print_report(summary: dict[str, dict], tput: list[dict], containers: int, failures: Failures) -> None:
    """The human-readable part; the JSON file has the same numbers and the raw samples."""
    print(f"\nexec latency of `true`, ms ({containers} containers round-robin, one exec at a time)")
    head = "{:<10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}"
    print(head.format("method", "n", "p50", "p90", "p99", "p99.9", "p50/runc", "p50/floor"))
    for method, r in summary.items():
        print(f"{method:<10} {r['n']:>6} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['p99.9_ms']:>8.3f} {_ratio(r['p50_vs_runc']):>9} {_ratio(r['p50_vs_floor']):>10}")
    print("(nsenter joins namespaces only, not cgroups; floor = posix_spawn+waitpid from inside)")
    print("\nthroughput of `true`")
    print("{:<10} {:>9} {:>7} {:>9} {:>10}".format("method", "in flight", "execs", "seconds", "execs/s"))
    for r in tput:
        print(f"{r['method']:<10} {r['inflight']:>9} {r['execs']:>7} {r['seconds']:>9.3f} "
              f"{r['execs_per_s']:>10.1f}")
    if failures.total():
        print(f"\nFAILED execs: {dict(failures.count)}", file=sys.stderr)
        for line in failures.examples:
            print(f"  {line}", file=sys.stderr)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file


# ---- main ------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts (CI): the whole run in well under 60 s")
    p.add_argument("-n", type=int, help="latency samples for warmexec and floor (default 2000, quick 200)")
    p.add_argument("--n-slow", type=int, help="latency samples for runc exec and nsenter "
                                              "(default 300, quick 30, never more than -n unless given)")
    p.add_argument("--containers", type=int, default=4, help="containers to spread execs over (default 4)")
    p.add_argument("--json", default=DEFAULT_JSON, help="results file (default bench/out/results.json)")
    args = p.parse_args(argv)
    for name in ("n", "n_slow", "containers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run(args: argparse.Namespace, box: RuncBox, tmp: str) -> tuple[dict, Failures]:
    """Containers, supervisor, measurements; the caller owns clean-up of box and tmp."""
    c = counts_from(args)
    failures = Failures()
    doc: dict = {"machine": machine_info(), "counts": dataclasses.asdict(c), "containers": args.containers}
    cids = [box.run(f"bench{i}") for i in range(args.containers)]
    try:
        sup = SupervisorProcess(box.root, tmp, metrics=False, log_level="WARNING")
    except AssertionError as exc:
        raise BenchError(str(exc)) from None
    client = Client(sup.endpoint)
    try:
        for cid in cids:
            try:
                wait_ready(client, cid, READY_TIMEOUT)
            except AssertionError as exc:
                raise BenchError(f"{exc}; containers: {client.list()}") from None
        t0 = time.monotonic()
        samples = measure_latency(box, client, cids, c, failures)
        doc["throughput"] = measure_throughput(box, client, cids, c, failures)
        doc["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        client.close()
        doc["supervisor_exit"] = sup.stop()
    doc["latency"] = summarize(samples)
    doc["samples_ns"] = samples
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["failures"] = {"count": dict(failures.count), "examples": failures.examples}
    return doc, failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("runc") or not shutil.which("nsenter"):
        print("bench: needs root, runc, nsenter and busybox", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="warmexec-bench-")
    box = None
    try:
        box = RuncBox()
        doc, failures = run(args, box, tmp)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        _show_log(os.path.join(tmp, "supervisor.log"))
        return 1
    finally:
        if box is not None:
            box.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(doc["latency"], doc["throughput"], args.containers, failures)
    write_json(args.json, doc)
    print(f"\nwrote {args.json}")
    if doc["supervisor_exit"] != 0:
        print(f"bench: supervisor exited with status {doc['supervisor_exit']} on SIGTERM", file=sys.stderr)
    return 1 if failures.total() or doc["supervisor_exit"] != 0 else 0


def _show_log(path: str) -> None:
    """The supervisor's last words, when it is why the bench failed."""
    try:
        with open(path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace").strip()
    except OSError:
        return
    if tail:
        print(f"--- supervisor log (tail) ---\n{tail}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
