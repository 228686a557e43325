"""The floor: what an exec costs from a process that is already in the container.

    python3 -m bench.floor --root ROOT --container CID -n 2000 [--warmup 20]

Joins one runc container exactly as a warmexec worker does (the worker's ``join``: the
container's cgroups by writing "0" to each ``cgroup.procs``, then its namespaces
through setns on the init's pidfd) and times ``posix_spawn`` of
``/bin/true`` plus ``waitpid``. No IPC, no supervisor: the cost any exec mechanism
must pay at least, so the other methods can be stated as a multiple of it.

Why a separate process: setns into a mount namespace needs a single-threaded
process, and the bench holds a ZeroMQ context (whose I/O threads would make it
multithreaded). Once joined, paths resolve inside the container, so everything is
imported and every host-side fd (stdout, the host's /proc) is open *before* joining.

Prints one JSON object on stdout: ``samples_ns``, ``failures`` and ``checks`` (the
joined state, read through the host's /proc, so a floor that silently measured the
host cannot pass for one that measured the container).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from warmexec.supervisor import discovery
from warmexec.worker.join import join

TRUE = "/bin/true"


def enter(root: str, cid: str) -> dict:
    """Join cid's namespaces and cgroups as a worker does; return the worker spec."""
    spec = discovery.from_state(root, cid, os.path.join(root, cid, "state.json")).spec()
    join(spec)  # cgroups, then every namespace
    return spec


def _read(procfd: int, rel: str) -> str:
    fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def check_joined(procfd: int, init_pid: int) -> dict:
    """Compare us, and a child we spawn, with the container's init via the host /proc.

    The child (``cat`` blocked on an empty pipe) shows the namespaces the measured
    ``true`` processes get; pid namespace membership only shows in children.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.posix_spawn("/bin/cat", ["cat"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
    os.close(r)
    try:
        checks = {ns: os.readlink(f"{pid}/ns/{ns}", dir_fd=procfd)
                  == os.readlink(f"{init_pid}/ns/{ns}", dir_fd=procfd)
                  for ns in ("pid", "mnt", "net", "ipc", "uts", "cgroup")}
        checks["cgroups"] = _read(procfd, f"{os.getpid()}/cgroup") == _read(procfd, f"{init_pid}/cgroup")
    finally:
        os.close(w)  # cat sees EOF and exits
        os.waitpid(pid, 0)
    return checks


def measure(n: int) -> tuple[list[int], int]:
    """n timed spawn+wait round trips of /bin/true; (latencies in ns, failures)."""
    samples = []
    failures = 0
    for _ in range(n):
        t0 = time.perf_counter_ns()
        pid = os.posix_spawn(TRUE, ["true"], {})
        _, status = os.waitpid(pid, 0)
        samples.append(time.perf_counter_ns() - t0)
        failures += status != 0
    return samples, failures


def _cpu() -> float:
    """CPU seconds of this process and the children it reaped (the measured commands)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def serve_batches(checks: dict, failures: int) -> int:
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        samples, failed = measure(int(line))
        failures += failed
        sys.stdout.write(json.dumps({"samples_ns": samples}) + "\n")
        sys.stdout.flush()
    sys.stdout.write(json.dumps({"failures": failures, "checks": checks}) + "\n")
    sys.stdout.flush()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="runc state root")
    p.add_argument("--container", required=True, help="runc container id")
    p.add_argument("-n", type=int, default=2000, help="timed iterations")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    p.add_argument("--barrier", action="store_true",
                   help='after the warm-up, print "ready" and start timing on a line from stdin '
                        "(so parallel floors start together, for throughput)")
    p.add_argument("--batches", action="store_true",
                   help='after the warm-up, print "ready"; then for each line N on stdin time N '
                        "execs and print their samples as a JSON line; at the end of stdin, the "
                        "failures and checks (so the bench can interleave the floor with warmexec)")
    args = p.parse_args()
    procfd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the host's
    spec = enter(args.root, args.container)
    # From here on paths resolve in the container: no imports, no host paths.
    checks = check_joined(procfd, spec["init_pid"])
    _, warm_failures = measure(args.warmup)
    if args.batches:
        return serve_batches(checks, warm_failures)
    if args.barrier:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    cpu0, t0 = _cpu(), time.perf_counter_ns()
    samples, failures = measure(args.n)
    elapsed, cpu = time.perf_counter_ns() - t0, _cpu() - cpu0
    sys.stdout.write(json.dumps({"samples_ns": samples, "failures": failures + warm_failures,
                                 "checks": checks, "elapsed_ns": elapsed, "cpu_s": cpu}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
