"""Streamed-exec throughput: MiB/s through a command's stdin, its stdout, both at once
(``cat``), and a terminal's output, with the supervisor's CPU per MiB.

    python3 -m bench.streams [--mib 256] [--runs 5]      # this part alone

Each way moves ``mib`` MiB through a real container, ``runs`` times, and reports the
median rate (from the exec request to its exit event) and the median CPU per MiB of
the supervisor process alone (the one that reads and writes the pipes; the worker
takes no part except for a terminal, which it relays) and of the client (the bench
process, which also pays for msgpack and ZeroMQ on its side):

* ``stdin``: ``cat > /dev/null`` fed by ``ExecStream.write`` (1 MiB window of stdin);
* ``stdout``: ``dd if=/dev/zero bs=64k``, read with the largest window (4 MiB);
* ``cat``: both at once, the client's stdin from a pipe a thread fills;
* ``tty_stdout``: the same ``dd`` on a terminal (``tty: true``), relayed by the
  worker: its CPU is counted too (``worker_ms_per_mib``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import psutil

from bench.common import Failures
from bench.resources import self_cpu, tree
from warmexec.protocol.client import Client
from warmexec.protocol.streams import MAX_WINDOW

MIB = 1 << 20
BLOCK = bytes(MIB)


class _Count:
    """A sink that counts what it is given."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)

    def flush(self) -> None:
        pass


def _drain(s) -> int:
    got = 0
    for kind, *rest in s.events():
        if kind == "output" and rest[0] == 1:
            got += len(rest[1])
    return got


def _stdin_way(client: Client, cid: str, mib: int) -> tuple[int, int]:
    s = client.stream(cid, ["sh", "-c", "cat > /dev/null"], interactive=True, window=MAX_WINDOW)
    s.next_event(30)  # started
    for i in range(mib):
        s.write(BLOCK, eof=i == mib - 1)
    _drain(s)
    return mib * MIB, s.result["exit_code"]


def _stdout_way(client: Client, cid: str, mib: int, tty: bool = False) -> tuple[int, int]:
    dd = f"dd if=/dev/zero bs=64k count={16 * mib} 2>/dev/null"  # 64 KiB writes (head's are 4 KiB)
    s = client.stream(cid, ["sh", "-c", dd], window=MAX_WINDOW, tty=tty)
    return _drain(s), s.result["exit_code"]


def _cat_way(client: Client, cid: str, mib: int) -> tuple[int, int]:
    r, w = os.pipe()

    def fill() -> None:
        try:
            for _ in range(mib):
                os.write(w, BLOCK)
        finally:
            os.close(w)

    feeder = threading.Thread(target=fill, daemon=True)
    feeder.start()
    sink = _Count()
    try:
        s = client.stream(cid, ["cat"], interactive=True, window=MAX_WINDOW)
        result = s.run(r, sink, sink)
    finally:
        feeder.join(30)
        os.close(r)
    return sink.n, result["exit_code"]


WAYS = {"stdin": _stdin_way, "stdout": _stdout_way, "cat": _cat_way,
        "tty_stdout": lambda c, cid, mib: _stdout_way(c, cid, mib, tty=True)}


def _cpu(p: psutil.Process | None) -> float:
    if p is None:
        return 0.0
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def _worker_of(sup_pid: int, cid: str) -> psutil.Process | None:
    """The container's worker: the one of the supervisor's workers in its cgroups."""
    for p in tree(sup_pid).get("workers", []):
        try:
            with open(f"/proc/{p.pid}/cgroup") as f:
                if cid in f.read():
                    return p
        except OSError:
            continue
    return None


def measure_streams(client: Client, sup_pid: int, cid: str, mib: int, runs: int, failures: Failures) -> dict:
    sup = psutil.Process(sup_pid)
    out: dict = {"mib": mib, "runs": runs, "ways": {}}
    for way, once in WAYS.items():
        rates, sup_ms, client_ms, worker_ms = [], [], [], []
        for _ in range(runs):
            worker = _worker_of(sup_pid, cid)
            s0, c0, w0, t0 = _cpu(sup), self_cpu(), _cpu(worker), time.monotonic()
            try:
                moved, code = once(client, cid, mib)
            except Exception as exc:  # noqa: BLE001 - a failed way is reported, the bench goes on
                failures.add(f"stream {way}", repr(exc))
                continue
            wall = time.monotonic() - t0
            if code != 0 or moved < mib * MIB:
                failures.add(f"stream {way}", f"exit {code}, {moved} of {mib * MIB} bytes")
                continue
            rates.append(moved / MIB / wall)
            sup_ms.append((_cpu(sup) - s0) * 1000 / mib)
            client_ms.append((self_cpu() - c0) * 1000 / mib)
            worker_ms.append((_cpu(worker) - w0) * 1000 / mib)
        out["ways"][way] = {
            "mib_s_median": round(statistics.median(rates), 1) if rates else None,
            "mib_s_runs": [round(x, 1) for x in rates],
            "supervisor_ms_per_mib": round(statistics.median(sup_ms), 3) if sup_ms else None,
            "client_ms_per_mib": round(statistics.median(client_ms), 3) if client_ms else None,
            "worker_ms_per_mib": round(statistics.median(worker_ms), 3) if worker_ms else None,
        }
    return out


def _cell(r: dict, key: str, fmt: str) -> str:
    return "-" if r[key] is None else format(r[key], fmt)


def print_streams(doc: dict) -> None:
    print(f"\nstreamed exec throughput, {doc['mib']} MiB each way, median of {doc['runs']} runs "
          "(cat: the same MiB in and out at once)")
    print("{:<11} {:>8} {:>14} {:>12} {:>12}".format("way", "MiB/s", "sup CPU ms/MiB", "client ms/MiB",
                                                     "worker ms/MiB"))
    for way, r in doc["ways"].items():
        sup, client, worker = (_cell(r, k, ".3f") for k in ("supervisor_ms_per_mib", "client_ms_per_mib",
                                                              "worker_ms_per_mib"))
        print(f"{way:<11} {_cell(r, 'mib_s_median', '.1f'):>8} {sup:>14} {client:>12} {worker:>12}")
    print("(worker: the container's default worker; it relays only a terminal's bytes)")


def main() -> int:
    from bench.common import start_supervisor  # noqa: PLC0415 - only the standalone run needs them
    from bench.harness import wait_ready  # noqa: PLC0415
    from bench.runcbox import RuncBox  # noqa: PLC0415
    from bench.scale import delete_all  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python3 -m bench.streams", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    box = RuncBox()
    try:
        cid = box.run("streams")
        sup = start_supervisor(box.root, os.path.join(box.dir, "sup"))
        try:
            with Client(sup.endpoint) as client:
                wait_ready(client, cid, 30)
                failures = Failures()
                print_streams(measure_streams(client, sup.proc.pid, cid, args.mib, args.runs, failures))
        finally:
            sup.stop()
    finally:
        delete_all(box)
        box.cleanup()
    if failures.total():
        print(f"failed: {failures.examples}")
    return 1 if failures.total() else 0


if __name__ == "__main__":
    raise SystemExit(main())
