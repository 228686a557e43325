"""Scheduled probes at scale: N warm containers each probed every P seconds (issue 14).

    python3 -m bench.probes_bench [--containers 500] [--seconds 60] [--period 1] [--json PATH]

One run, busybox containers under a private runc root (shared read-only rootfs, as the
scale part starts them), three phases:

1. a supervisor without probes, every container warm: the client's exec latency of
   `true`, sequential, round-robin (the baseline);
2. a supervisor whose one ``[[probes]]`` runs `true` in every container every P
   seconds: over S seconds of probing alone, the CPU of warmexec's whole tree
   (supervisor, zygote, workers, and the probe commands they reaped: bench/resources.py)
   as a share of one core, the probe runs made and skipped, their schedule lag and
   duration (p50/p99 estimated from the supervisor's own histograms, as
   histogram_quantile does); then the client's latency again, with the probes running;
3. runc exec's CPU per exec of `true` on the same containers, times the same rate: what
   the same probing through `runc exec` would need, against the machine's cores.

Figures are reported, never asserted (a shared VM is noisy): ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from bench.common import BenchError, Failures, pcts, ratio
from bench.harness import SupervisorProcess
from bench.measure import timed_loop, warmexec_once
from bench.resources import cpu_delta, cpu_snapshot, runc_cpu, tree
from bench.runcbox import RuncBox
from bench.scale import delete_all, start_many, wait_all_ready
from warmexec.protocol.client import Client

LATENCY_SAMPLES = 300
RUNC_EXECS = 100

PROBES = """
[limits]
max_probes_inflight = {budget}
[[probes]]
name = "bench"
argv = ["true"]
containers = ["*-pb*"]
period = {period}
timeout = 5
"""


def latency(client: Client, cids: list[str], failures: Failures) -> dict:
    samples = timed_loop(cids, LATENCY_SAMPLES, 20, lambda cid: warmexec_once(client, cid, failures))
    return {"n": len(samples), **pcts(samples, (50.0, 90.0, 99.0))}


def scrape(port: int) -> dict[str, list]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(body)}


def buckets(samples: list, name: str) -> dict[float, float]:
    """A histogram's cumulative buckets, summed over its series: le -> count."""
    out: dict[float, float] = {}
    for s in samples:
        if s.name == name + "_bucket":
            out[float(s.labels["le"])] = out.get(float(s.labels["le"]), 0.0) + s.value
    return out


def quantile(before: list, after: list, name: str, q: float) -> float | None:
    """histogram_quantile over what the histogram gained between two scrapes (linear
    within a bucket, as Prometheus does)."""
    b0 = buckets(before, name)
    buckets_ = sorted((le, n - b0.get(le, 0.0)) for le, n in buckets(after, name).items())
    if not buckets_ or buckets_[-1][1] == 0:
        return None
    rank, prev_le, prev_n = q * buckets_[-1][1], 0.0, 0.0
    for le, n in buckets_:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-12)
        prev_le, prev_n = le, n
    return None


def counter(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def probing(box: RuncBox, cids: list[str], workdir: str, args: argparse.Namespace,
            failures: Failures) -> dict:
    budget = max(64, len(cids))
    sup = SupervisorProcess(box.root, workdir, PROBES.format(period=args.period, budget=budget),
                            log_level="WARNING")
    try:
        with Client(sup.endpoint) as client:
            wait_all_ready(client, cids, 60 + 0.2 * len(cids))
            time.sleep(2 * args.period)  # the spread first runs of every container: steady state
            procs = tree(sup.proc.pid)
            s0 = time.perf_counter()  # runs are counted scrape to scrape, CPU snapshot to snapshot
            m0, before, t0 = scrape(sup.metrics_port), cpu_snapshot(procs), time.perf_counter()
            time.sleep(args.seconds)  # the probes' own pace: nothing else runs meanwhile
            after, wall, m1 = cpu_snapshot(procs), time.perf_counter() - t0, scrape(sup.metrics_port)
            counted = time.perf_counter() - s0
            by_role, lost = cpu_delta(before, after)
            delta = lambda family, **labels: (counter(m1[family], family + "_total", **labels)  # noqa: E731
                                              - counter(m0[family], family + "_total", **labels))
            runs, ok = delta("warmexec_probe_results"), delta("warmexec_probe_results", result="success")
            skipped = delta("warmexec_probe_skipped")
            cpu = sum(by_role.values())
            row = {"containers": len(cids), "period_s": args.period, "seconds": round(wall, 2),
                   "planned_runs": round(len(cids) * counted / args.period), "runs": runs, "skipped": skipped,
                   "not_success": runs - ok,
                   "cpu_pct_of_one_core": round(100 * cpu / wall, 2),
                   "cpu_by_part_pct": {k: round(100 * v / wall, 2) for k, v in by_role.items()},
                   "cpu_per_1000_probes_s": round(1000 * cpu / runs, 3) if runs else None, "vanished": lost}
            for key, metric in (("lag", "warmexec_probe_lag_seconds"),
                                ("duration", "warmexec_probe_duration_seconds")):
                qs = {q: quantile(m0[metric], m1[metric], metric, q) for q in (0.5, 0.99)}
                row[key] = {f"p{int(q * 100)}_ms": None if v is None else round(v * 1000, 3)
                            for q, v in qs.items()}
            row["client_latency_with_probes"] = latency(client, cids, failures)
        return row
    finally:
        sup.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--containers", type=int, default=500)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--period", type=float, default=1.0)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "out", "probes.json"))
    args = p.parse_args(argv)
    failures = Failures()
    tmp = tempfile.mkdtemp(prefix="warmexec-probes-bench-")
    box = RuncBox(os.path.join(tmp, "box"))
    try:
        cids = start_many(box, [f"pb{i}" for i in range(args.containers)])
        for d in ("base", "probing"):
            os.makedirs(os.path.join(tmp, d))
        base = SupervisorProcess(box.root, os.path.join(tmp, "base"), log_level="WARNING")
        try:
            with Client(base.endpoint) as client:
                wait_all_ready(client, cids, 60 + 0.2 * len(cids))
                baseline = latency(client, cids, failures)
        finally:
            base.stop()
        probed = probing(box, cids, os.path.join(tmp, "probing"), args, failures)
        runc = runc_cpu(box, cids, RUNC_EXECS, failures)
    finally:
        delete_all(box)
        box.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = args.containers / args.period
    runc_pct = rate * runc["cpu_per_1000_s"] / 1000 * 100
    doc = {"args": vars(args), "cores": os.cpu_count(), "client_latency_without_probes": baseline,
           "probing": probed, "runc_exec": runc,
           "runc_exec_needed_pct_of_one_core": round(runc_pct, 1),
           "runc_exec_needed_vs_cores": round(runc_pct / 100 / (os.cpu_count() or 1), 2),
           "runc_vs_warmexec_cpu": ratio(runc_pct, probed["cpu_pct_of_one_core"], 1),
           "client_p50_with_vs_without": ratio(probed["client_latency_with_probes"]["p50_ms"],
                                               baseline["p50_ms"], 2),
           "failures": dict(failures.count), "failure_examples": failures.examples}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2))
    return 1 if failures.total() else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench: {exc}") from None
