"""Exec latency, throughput, CPU and memory of warmexec against runc, docker and ctr exec, nsenter, the floor.

    python3 -m bench.bench [--quick] [-n N] [--n-slow M] [--containers K] [--tput-containers T]
                           [--scale 1,100,500] [--warm-containers W] [--n-engine E] [--json PATH]
                           [--n-cri C] [--stream-mib M] [--chart PATH]

One run, one ``warmexec serve`` subprocess per part, busybox containers under private
runc roots (see :mod:`bench.runcbox`) and, for the engine part, a private dockerd's:

1. latency of ``true`` one exec at a time, K containers round-robin: warmexec and the
   in-namespace floor taking turns 50 execs at a time (so that the machine's drift
   weighs on both alike), then runc exec, nsenter and a bare ZeroMQ round trip
   (:mod:`bench.measure`);
2. throughput over T containers (8): warmexec with 1, 8, 32 and 128 in flight, the floor
   with one and one-per-CPU spawn loops, runc exec with 1 and 8
   parallel subprocesses (and 32 in a full run);
3. CPU seconds per 1000 execs, warmexec's whole process tree against runc exec and
   everything it reaps, the client's own CPU beside both (:mod:`bench.resources`);
   then streamed-exec throughput on the first container: MiB/s through stdin, stdout,
   both at once (``cat``) and a terminal, median of 5 runs of 256 MiB (quick 3 of 16),
   with the supervisor's, the client's and the worker's CPU per MiB (:mod:`bench.streams`);
4. warm-up: containers started one at a time, from ``runc run -d`` returning to their
   worker READY and to their first exec done (:mod:`bench.scale`);
5. engines, on one busybox container of a private Docker engine (:mod:`bench.engines`,
   :mod:`bench.dockerbox`) served by its own supervisor: latency and CPU per exec of
   warmexec, ``docker exec`` and containerd's ``ctr task exec``, taking turns (200 docker
   and ctr execs, quick 20); skipped, with the reason printed, where dockerd cannot run;
6. CRI (:mod:`bench.cri_bench`, :mod:`bench.cribox`): ExecSync of ``true`` on one
   container of a private containerd's CRI pod, through ``warmexec cri`` and containerd's
   CRI socket directly, taking turns: latency and CPU per call (300 each, quick 20), and
   a check that the supervisor ran every proxied call; skipped, with the reason printed,
   where that containerd cannot run;
7. scale, under a fresh supervisor: 1, 100 and 500 warm containers (1 and 20 with
   --quick); warmexec's memory (USS, PSS) per container and the supervisor's, idle CPU,
   and exec latency round-robin over all of them;
8. a chart (bench/out/latency.png, needs matplotlib: ``pip install '.[bench]'``).

Prints tables with ratios, writes everything (raw samples and machine info included)
as JSON. Exits 1 if any exec, the engine part or the CRI part failed. Timings are
reported, never asserted: a shared 2-core VM is noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench.chart import write_chart
from bench.common import FULL, QUICK, BenchError, Counts, Failures, start_supervisor
from bench.cri_bench import measure_cri
from bench.engines import measure_engines
from bench.harness import wait_ready
from bench.measure import measure_latency, measure_throughput, summarize
from bench.report import print_report
from bench.resources import measure_cpu
from bench.runcbox import RuncBox
from bench.scale import delete_all, measure_scale, measure_warmup
from bench.streams import measure_streams
from warmexec.protocol.client import Client

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "out", "results.json")
READY_TIMEOUT = 30.0


def counts_from(args: argparse.Namespace) -> Counts:
    """Defaults, then --quick, then explicit options win."""
    c = dataclasses.replace(QUICK if args.quick else FULL)
    if args.n is not None:
        c.fast = args.n
        c.slow = min(c.slow, args.n)
    if args.n_slow is not None:
        c.slow = args.n_slow
    if args.scale is not None:
        c.scale = args.scale
    if args.warm_containers is not None:
        c.warm_containers = args.warm_containers
    if args.n_engine is not None:
        c.engine_slow = args.n_engine
    if args.n_cri is not None:
        c.cri = args.n_cri
    if args.stream_mib is not None:
        c.stream_mib = args.stream_mib
    c.warmup = max(c.warmup, 2 * args.containers)  # every container's worker warmed twice
    return c


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
        "mem_total_mib": mem_total_mib(),
        "cgroup": "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1/hybrid",
    }


def mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) // 1024
    except (OSError, StopIteration, ValueError):
        return None


# ---- the parts ---------------------------------------------------------------------

def measure_small(args: argparse.Namespace, box: RuncBox, workdir: str, c: Counts,
                  failures: Failures) -> dict:
    """Latency, CPU and warm-up on args.containers containers; throughput spread over
    args.tput_containers (the first ones and more, if more)."""
    all_cids = [box.run(f"bench{i}") for i in range(max(args.containers, args.tput_containers))]
    cids = all_cids[:args.containers]
    sup = start_supervisor(box.root, workdir)
    client = Client(sup.endpoint)
    out: dict = {}
    try:
        for cid in all_cids:
            try:
                wait_ready(client, cid, READY_TIMEOUT)
            except AssertionError as exc:
                raise BenchError(f"{exc}; containers: {client.list()}") from None
        t0 = time.monotonic()
        samples = measure_latency(box, client, cids, c, failures)
        out["throughput"] = measure_throughput(box, client, sup.proc.pid, all_cids[:args.tput_containers],
                                               c, args.quick, failures)
        out["cpu"] = measure_cpu(box, client, sup.proc.pid, cids, c.cpu, c.cpu_runc, failures)
        if c.stream_mib:
            out["streams"] = measure_streams(client, sup.proc.pid, cids[0], c.stream_mib, c.stream_runs,
                                             failures)
        out["warmup"] = measure_warmup(box, client, c.warm_containers, failures)
        out["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        client.close()
        out["supervisor_exit"] = sup.stop()
    out["latency"] = summarize(samples)
    out["samples_ns"] = samples
    return out


def run(args: argparse.Namespace, boxes: list[RuncBox], tmp: str) -> tuple[dict, Failures]:
    """Every part in turn; the caller deletes the boxes' containers and tmp."""
    c = counts_from(args)
    failures = Failures()
    doc: dict = {"machine": machine_info(), "counts": dataclasses.asdict(c), "containers": args.containers,
                 "tput_containers": args.tput_containers}
    boxes.append(RuncBox())
    doc.update(measure_small(args, boxes[0], os.path.join(tmp, "small"), c, failures))
    delete_all(boxes[0])  # idle containers of the first part must not weigh on the next
    # before the scale part: the kernel is still tearing its 500 containers down after it
    doc["engines"] = measure_engines(os.path.join(tmp, "engines"), c, failures)
    doc["cri"] = measure_cri(os.path.join(tmp, "cri"), c, failures)
    if c.scale:
        boxes.append(RuncBox())
        t0 = time.monotonic()
        doc["scale"] = measure_scale(boxes[1], os.path.join(tmp, "scale"), c, failures)
        doc["scale"]["seconds"] = round(time.monotonic() - t0, 1)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["failures"] = {"count": dict(failures.count), "examples": failures.examples}
    return doc, failures


# ---- main ------------------------------------------------------------------------

def _counts_list(text: str) -> tuple[int, ...]:
    counts = tuple(int(x) for x in text.split(",") if x.strip())
    if any(n < 1 for n in counts) or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError("increasing positive counts, e.g. 1,100,500 (empty: skip)")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts (CI): the whole run in about a minute")
    p.add_argument("-n", type=int, help="latency samples for warmexec and floor (default 2000, quick 200)")
    p.add_argument("--n-slow", type=int, help="latency samples for runc exec and nsenter "
                                              "(default 300, quick 30, never more than -n unless given)")
    p.add_argument("--containers", type=int, default=4,
                   help="containers the latency and CPU execs go round-robin over (default 4)")
    p.add_argument("--tput-containers", type=int, default=8,
                   help="containers the throughput execs are spread over (default 8)")
    p.add_argument("--scale", type=_counts_list, help="warm container counts for memory and latency at "
                                                      "scale (default 1,100,500, quick 1,20; '' skips)")
    p.add_argument("--warm-containers", type=int,
                   help="containers whose warm-up is timed (default 20, quick 5)")
    p.add_argument("--n-engine", type=int, help="docker exec and ctr exec samples on the private Docker "
                                                "engine's container (default 200, quick 20; 0 skips it)")
    p.add_argument("--n-cri", type=int, help="ExecSync calls through warmexec cri and to containerd's CRI "
                                             "directly, each (default 300, quick 20; 0 skips it)")
    p.add_argument("--stream-mib", type=int, help="MiB through each way of a streamed exec's stdin, stdout, "
                                                  "cat and terminal (default 256, quick 16; 0 skips it)")
    p.add_argument("--json", default=DEFAULT_JSON, help="results file (default bench/out/results.json)")
    p.add_argument("--chart", help="PNG chart (default latency.png beside the JSON file)")
    args = p.parse_args(argv)
    for name in ("n", "n_slow", "containers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warm_containers", "n_engine", "n_cri", "stream_mib"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    args.chart = args.chart or os.path.join(os.path.dirname(os.path.abspath(args.json)), "latency.png")
    return args


def clean(box: RuncBox) -> None:
    """Every container under the box's root, even one whose start failed half-way."""
    try:
        delete_all(box)
    finally:
        box.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("runc") or not shutil.which("nsenter"):
        print("bench: needs root, runc, nsenter and busybox", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)  # so that clean-up runs (CI time-outs)
    t0 = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="warmexec-bench-")
    boxes: list[RuncBox] = []
    try:
        doc, failures = run(args, boxes, tmp)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        for part in ("small", "scale"):
            _show_log(os.path.join(tmp, part, "supervisor.log"))
        return 1
    finally:
        for box in boxes:
            clean(box)
        shutil.rmtree(tmp, ignore_errors=True)
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    print_report(doc, failures)
    doc["chart"] = write_chart(args.chart, doc)
    write_json(args.json, doc)
    print(f"\nwrote {args.json}" + (f" and {doc['chart']}" if doc["chart"] else "") + f" ({doc['wall_s']} s)")
    exits = [doc["supervisor_exit"], *((doc.get(part) or {}).get("supervisor_exit", 0)
                                       for part in ("scale", "engines", "cri"))]
    if any(exits):
        print(f"bench: supervisor exit statuses on SIGTERM: {exits}", file=sys.stderr)
    engine_error = doc["engines"].get("error")
    if engine_error:
        print(f"bench: the engine part failed: {engine_error}", file=sys.stderr)
    cri_error = doc["cri"].get("error")
    if cri_error:
        print(f"bench: the CRI part failed: {cri_error}", file=sys.stderr)
    return 1 if failures.total() or any(exits) or engine_error or cri_error else 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def write_json(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file


def _show_log(path: str) -> None:
    """The supervisor's last words, when it is why the bench failed."""
    try:
        with open(path, "rb") as f:
            tail = f.read()[-4000:].decode(errors="replace").strip()
    except OSError:
        return
    if tail:
        print(f"--- supervisor log (tail: {path}) ---\n{tail}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
