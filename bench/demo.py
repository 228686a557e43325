"""The demo: a busybox container under runc, the supervisor, and execs through it.

    sudo bash bench/demo.sh            # what the README's first command runs
    sudo bash bench/demo.sh --quick    # fewer execs (CI)

Everything lives under a private runc root and a temporary directory, and is removed
at the end; the host's own containers are never touched.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from warmexec.protocol import Client

from .harness import SupervisorProcess, wait_ready
from .runcbox import RuncBox

SHOWN_METRICS = ("warmexec_exec_exits_total", "warmexec_workers{", "warmexec_exec_spawn_seconds_count")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return sorted(out)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3


def show(client: Client, cid: str, argv: list[str], **kw: object) -> None:
    r = client.exec(cid, argv, **kw)
    out = (r["stdout"] + r["stderr"]).decode(errors="replace").strip()
    extra = " (timed out)" if r["timed_out"] else ""
    print(f"$ warmexec exec {cid} -- {' '.join(argv)}\n{out}\n-> exit {r['exit_code']}{extra}, "
          f"pid {r['pid']} (in container {r['container_pid']}), "
          f"{r['timings']['total'] / 1000:.2f} ms\n")


def main() -> int:
    ap = argparse.ArgumentParser(description="warmexec demo")
    ap.add_argument("--quick", action="store_true", help="fewer execs")
    args = ap.parse_args()
    n_we, n_runc = (200, 20) if args.quick else (2000, 200)

    box = RuncBox()
    sup = None
    try:
        print("starting a busybox container under runc ...")
        cid = box.run("demo")
        sup = SupervisorProcess(box.root, tempfile.mkdtemp(prefix="warmexec-demo-"), log_level="INFO")
        print(f"supervisor up at {sup.endpoint}, metrics on :{sup.metrics_port}\n")
        with Client(sup.endpoint) as client:
            row = wait_ready(client, cid)
            print(f"container {cid}: init pid {row['pid']}, warm worker pid {row['worker_pid']}\n")
            show(client, cid, ["sh", "-c", "hostname; id; cat /proc/self/cgroup | head -3"])
            show(client, cid, ["id"], user="alice")
            show(client, cid, ["sh", "-c", "echo failing >&2; exit 3"])
            show(client, cid, ["no-such-command"])
            show(client, cid, ["sleep", "10"], timeout=0.3)

            print(f"latency of `true`: {n_we} execs through warmexec, {n_runc} through runc exec ...")
            we = timed(lambda: client.exec(cid, ["true"]), n_we)
            runc = timed(lambda: subprocess.run(["runc", "--root", box.root, "exec", cid, "true"],
                                                stdin=subprocess.DEVNULL, check=True), n_runc)
        print(f"{'':12}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
        for name, xs in (("warmexec", we), ("runc exec", runc)):
            print(f"{name:12}{pct(xs, 50):9.3f}{pct(xs, 90):9.3f}{pct(xs, 99):9.3f}")
        print(f"\nwarmexec median is {statistics.median(runc) / statistics.median(we):.1f}x faster "
              "than runc exec on this machine (one run; see bench/ for the full benchmark)\n")
        text = urllib.request.urlopen(f"http://127.0.0.1:{sup.metrics_port}/metrics", timeout=5).read()
        print("a few of the metrics Prometheus would scrape:")
        for line in text.decode().splitlines():
            if line.startswith(SHOWN_METRICS):
                print("  " + line)
        return 0
    finally:
        if sup is not None:
            sup.stop()
        box.cleanup()


if __name__ == "__main__":
    sys.exit(main())
