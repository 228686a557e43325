"""CPU per exec and memory of warmexec's processes, against runc exec's CPU.

warmexec's processes are the supervisor's tree (docs/ARCHITECTURE.md), by depth:

    supervisor -> zygote -> workers -> commands (each exec, reaped by their worker)

(A worker is forked by a short-lived joiner, and the zygote adopts it once the joiner
has exited; a quick command's zombie lives until the supervisor's ack, at most 20 ms
after its exit: commands are counted when reaped, as below.)

A process's CPU reaches its parent's ``children_user/children_system`` only once the
parent reaps it. So the whole tree's CPU over a batch of execs is, for every process
that lives through the batch, its own CPU plus what it reaped during the batch: the
commands, reaped by whoever spawned them. Long-lived processes are not reaped during a
batch, so nothing is counted twice (a process that does die in between is reported as
"vanished": its CPU before the batch would then be counted too).

runc exec's CPU is the bench's RUSAGE_CHILDREN: each ``runc exec`` reaps its
``runc init`` stages and the command (CLONE_PARENT makes them its children), and the
bench reaps ``runc exec``. The client's own CPU (the bench process, RUSAGE_SELF: its
ZeroMQ I/O thread included) is reported beside both, since a real client pays it too.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import psutil

from bench.common import Failures, ratio
from bench.measure import runc_cmd, subprocess_once, warmexec_once
from bench.runcbox import RuncBox
from warmexec.protocol.client import Client

DEPTHS = ("supervisor", "zygote", "workers")
MIB = 1024 * 1024


# ---- the process tree ------------------------------------------------------------

def tree(sup_pid: int) -> dict[str, list[psutil.Process]]:
    """The supervisor's processes by depth (see DEPTHS), as they are now: between
    execs, only long-lived ones."""
    level = [psutil.Process(sup_pid)]
    out = {}
    for role in DEPTHS:
        if not level:
            break
        out[role] = level
        level = [c for p in level for c in _children(p)]
    return out


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children()
    except psutil.NoSuchProcess:
        return []


def _cpu(p: psutil.Process) -> tuple[float, float] | None:
    """(own CPU, reaped children's user+system) in seconds; None if gone.

    Own CPU is the sum of the threads' run time in /proc/PID/task/*/schedstat, in ns:
    user+system in /proc/PID/stat are whole clock ticks (10 ms), which a process that
    ran one exec in a batch (a worker among 500) never reaches. Children's times are
    summed exactly by the kernel and only truncated to a tick on output."""
    try:
        t = p.cpu_times()
        own = _run_time(p.pid)
    except psutil.NoSuchProcess:
        return None
    return t.user + t.system if own is None else own, t.children_user + t.children_system


def _run_time(pid: int) -> float | None:
    """Seconds on a CPU, all threads of pid; None without schedstat (CONFIG_SCHED_INFO)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            if not os.path.exists("/proc/self/schedstat"):
                return None
            continue  # that thread has just exited
    return total / 1e9


def cpu_snapshot(procs: dict[str, list[psutil.Process]]) -> dict[str, dict[int, tuple[float, float]]]:
    return {role: {p.pid: c for p in ps if (c := _cpu(p)) is not None} for role, ps in procs.items()}


def cpu_delta(before: dict, after: dict) -> tuple[dict[str, float], int]:
    """CPU seconds per depth, plus "commands" (all that was reaped), between two
    snapshots of the same processes, and how many of them vanished in between."""
    out = dict.fromkeys((*before, "commands"), 0.0)
    lost = 0
    for role, pids in before.items():
        for pid, (own, kids) in pids.items():
            if pid not in after[role]:
                lost += 1
                continue
            out[role] += after[role][pid][0] - own
            out["commands"] += after[role][pid][1] - kids
    return out, lost


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---- CPU per exec ----------------------------------------------------------------

def _batch(n: int, cids: list[str], once: Callable[[str], None]) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        once(cids[i % len(cids)])
    return time.perf_counter() - t0


def warmexec_cpu(client: Client, sup_pid: int, cids: list[str], n: int, failures: Failures) -> dict:
    """CPU of n sequential execs of `true` (workers already warm), per 1000 execs."""
    procs = tree(sup_pid)
    before, self0 = cpu_snapshot(procs), self_cpu()
    wall = _batch(n, cids, lambda cid: warmexec_once(client, cid, failures))
    client_s, (by_role, lost) = self_cpu() - self0, cpu_delta(before, cpu_snapshot(procs))
    per = 1000.0 / n
    return {"execs": n, "wall_s": round(wall, 3), "processes": sum(map(len, procs.values())),
            "vanished": lost, "cpu_per_1000_s": round(sum(by_role.values()) * per, 3),
            "by_part_per_1000_s": {k: round(v * per, 3) for k, v in by_role.items()},
            "client_per_1000_s": round(client_s * per, 3)}


def runc_cpu(box: RuncBox, cids: list[str], n: int, failures: Failures) -> dict:
    """CPU of n sequential `runc exec ... true` (runc and all it reaped), per 1000."""
    kids0, self0 = _children_cpu(), self_cpu()
    wall = _batch(n, cids, lambda cid: subprocess_once("runc exec", runc_cmd(box, cid), failures))
    kids, client_s = _children_cpu() - kids0, self_cpu() - self0
    per = 1000.0 / n
    return {"execs": n, "wall_s": round(wall, 3), "cpu_per_1000_s": round(kids * per, 3),
            "client_per_1000_s": round(client_s * per, 3)}


def measure_cpu(box: RuncBox, client: Client, sup_pid: int, cids: list[str], n_we: int, n_runc: int,
                failures: Failures) -> dict:
    we = warmexec_cpu(client, sup_pid, cids, n_we, failures)
    runc = runc_cpu(box, cids, n_runc, failures)
    both = lambda r: r["cpu_per_1000_s"] + r["client_per_1000_s"]
    return {"warmexec": we, "runc exec": runc,
            "runc_vs_warmexec": ratio(runc["cpu_per_1000_s"], we["cpu_per_1000_s"], 2),
            "runc_vs_warmexec_with_client": ratio(both(runc), both(we), 2)}


def idle_cpu(sup_pid: int, seconds: float) -> dict:
    """Percent of one core the whole tree spends with no exec running, over seconds."""
    procs = tree(sup_pid)
    before = cpu_snapshot(procs)
    t0 = time.perf_counter()
    time.sleep(seconds)
    after = cpu_snapshot(procs)
    wall = time.perf_counter() - t0
    by_role, _ = cpu_delta(before, after)
    return {"seconds": round(wall, 2), "cpu_pct": round(100 * sum(by_role.values()) / wall, 2),
            "supervisor_pct": round(100 * by_role["supervisor"] / wall, 2)}


# ---- memory ----------------------------------------------------------------------

def _mem(p: psutil.Process) -> dict[str, float] | None:
    try:
        m = p.memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return {"rss": m.rss / MIB, "uss": m.uss / MIB, "pss": m.pss / MIB}


def _round(d: dict[str, float] | None) -> dict[str, float] | None:
    return None if d is None else {f"{k}_mib": round(v, 3) for k, v in d.items()}


def _pid_ns(pid: int, which: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{which}")
    except OSError:
        return None


def by_container(sup_pid: int, init_pids: list[int]) -> list[list[psutil.Process]]:
    """The supervisor's descendants living for each container: those whose children
    are born in the container's pid namespace (its workers, whatever their profile,
    which are in it themselves)."""
    mine: dict[str, list[psutil.Process]] = {}
    for p in psutil.Process(sup_pid).children(recursive=True):
        ns = _pid_ns(p.pid, "pid_for_children")
        if ns is not None:
            mine.setdefault(ns, []).append(p)
    return [mine.get(_pid_ns(pid, "pid") or "", []) for pid in init_pids]


def container_memory(procs: list[psutil.Process]) -> dict[str, float] | None:
    """USS and PSS summed over one container's processes (commands have all exited)."""
    mems = [m for m in map(_mem, procs) if m is not None]
    if not mems:
        return None
    return {"uss": sum(m["uss"] for m in mems), "pss": sum(m["pss"] for m in mems), "procs": len(mems)}


def measure_memory(client: Client, sup_pid: int) -> dict:
    """Supervisor, zygote, and the median container's worker(s) (USS, PSS)."""
    sup = psutil.Process(sup_pid)
    zygotes = [m for m in map(_mem, sup.children()) if m is not None]
    groups = by_container(sup_pid, [r["pid"] for r in client.list()])
    per = [m for procs in groups if (m := container_memory(procs)) is not None]
    med = lambda key: round(statistics.median(m[key] for m in per), 3) if per else None
    total = sum(m["pss"] for m in per) + sum(z["pss"] for z in zygotes)
    sup_mem = _mem(sup)
    return {"supervisor": _round(sup_mem), "zygote": _round(zygotes[0]) if zygotes else None,
            "supervisor_fds": sup.num_fds(), "containers_measured": len(per),
            "per_container_uss_mib_p50": med("uss"), "per_container_pss_mib_p50": med("pss"),
            "per_container_procs_p50": med("procs"),
            "total_pss_mib": round(total + (sup_mem["pss"] if sup_mem else 0), 1)}
