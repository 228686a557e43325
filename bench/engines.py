"""warmexec against ``docker exec`` and containerd's own exec, on one Docker container.

A private Docker engine (:class:`bench.dockerbox.DockerBox`: Debian's dockerd 20.10 and
the containerd 1.6 it starts, in a mount namespace of their own) runs one busybox
container; a ``warmexec serve`` watches its runc root (``<exec-root>/runtime-runc/moby``)
with ``docker_host`` set to the private socket. On that container, one exec of ``true``
at a time through:

* warmexec    - ``Client.exec`` by the container's id;
* docker exec - Debian's ``/usr/bin/docker -H unix://<private socket> exec ID true``:
  the CLI, dockerd, containerd, the container's shim, ``runc exec``;
* ctr exec    - ``ctr --address <containerd socket> -n moby task exec --exec-id X ID true``:
  containerd's own client, the same path without dockerd. The socket is the ``[grpc]
  address`` of the config dockerd starts containerd with (``<exec-root>/containerd/
  containerd.toml``). ctr's I/O fifos go in a directory of the box's (``--fifo-dir``): its
  default, /run/containerd/fifo, would be made in the host's /run, which the shim (in the
  daemon's namespace, with a /run of its own) does not see.

The methods take turns, TURN execs of each slow one and a proportional share of
warmexec's at a time, in rotating order, so that the machine's drift weighs on all of
them alike. CPU is counted around every turn, so latency and CPU come from the same
execs:

* docker exec, ctr exec: the CLI (the bench's RUSAGE_CHILDREN, as for runc exec in
  :mod:`bench.resources`), plus the daemon side: dockerd, containerd and the container's
  shim, each its own CPU (all threads' run time), and what they reaped: ``runc exec``,
  its ``runc init`` stages and the command, the shim's children or reparented to it (a
  subreaper). dockerd counts for ctr exec too: it owns the container and handles
  containerd's events of every exec (about 4 ms each here); a host with containerd
  alone would not pay that part;
* warmexec: its whole process tree, counted as :mod:`bench.resources` counts it.

The bench process's own CPU (the Python client; fork and exec of a CLI) is reported
beside each as the client's. What the other side's processes spend during a method's
turns (the engine idling while warmexec execs; warmexec's supervisor reading the exec
events of Docker's event stream during docker exec) is kept as "meanwhile", not added.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
import tomllib
from collections.abc import Callable

import psutil

from bench.common import BenchError, Counts, Failures, percentile, ratio, start_supervisor
from bench.dockerbox import DOCKER, DockerBox, DockerUnavailable
from bench.harness import wait_ready
from bench.measure import warmexec_once
from bench.resources import _children_cpu, cpu_delta, cpu_snapshot, self_cpu, tree
from warmexec.protocol.client import Client

CTR = "/usr/bin/ctr"  # Debian's containerd package, by path as DockerBox takes docker's
PERCENTILES = (50.0, 90.0, 99.0)
TURN = 10  # execs of a slow method per turn
WARMUP_FAST, WARMUP_SLOW = 20, 3  # untimed execs per method first
READY_TIMEOUT = 30.0
REAPED = "runc and command"  # what the daemons reaped: runc exec, runc init, `true`
EXEC_SIDE = {"warmexec": ("supervisor", "zygote", "workers", "commands"),
             "docker exec": ("cli", "dockerd", "containerd", "shim", REAPED),
             "ctr exec": ("cli", "containerd", "shim", REAPED, "dockerd")}


def measure_engines(workdir: str, c: Counts, failures: Failures) -> dict:
    """The engine part: {"skipped": why} when there is no private dockerd here, with
    "error" when it failed once started (the rest of the bench goes on either way)."""
    t0 = time.monotonic()
    if not c.engine_slow:
        return {"skipped": "--n-engine 0"}
    try:
        box = DockerBox()
    except DockerUnavailable as exc:
        return {"skipped": f"no private dockerd on this host: {exc}",
                "seconds": round(time.monotonic() - t0, 1)}
    out: dict = {"notes": []}
    return measured(box, lambda: _measure(box, workdir, c, failures, out, t0), out, "dockerd_log", t0)


def measured(box, measure: Callable[[], None], out: dict, log_key: str, t0: float) -> dict:
    """Run measure() on a started engine box: a failure is recorded in out with the
    daemon's log tail (the bench goes on); the box is cleaned up whatever happens."""
    try:
        measure()
    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError, psutil.Error) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out[log_key] = box.log_tail(1500)
    finally:
        t1 = time.monotonic()
        box.cleanup()
        out["cleanup_s"] = round(time.monotonic() - t1, 1)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---- the engine's processes ------------------------------------------------------

def containerd_of(box: DockerBox) -> psutil.Process:
    """The containerd dockerd started (its child, with a config in dockerd's exec root)."""
    for child in psutil.Process(box.proc.pid).children():
        if child.name() == "containerd":
            return child
    raise BenchError(f"dockerd {box.proc.pid} has no containerd child")


def containerd_address(containerd: psutil.Process, box: DockerBox) -> str:
    """The [grpc] address of containerd's --config (dockerd 20.10 writes one in its exec root)."""
    cmd = containerd.cmdline()
    address = os.path.join(box.exec_root, "containerd", "containerd.sock")
    if "--config" in cmd[:-1]:
        with open(cmd[cmd.index("--config") + 1], "rb") as f:
            address = tomllib.load(f).get("grpc", {}).get("address") or address
    if not os.path.exists(address):
        raise BenchError(f"containerd's socket {address} is not there")
    return address


def engine_versions(box: DockerBox) -> dict:
    status, v = box.api("GET", "/version")
    out = {"docker": v.get("Version") if status == 200 else None}
    for comp in (v.get("Components") or []) if status == 200 else []:
        if comp.get("Name") in ("containerd", "runc"):
            out[comp["Name"]] = comp.get("Version")
    if os.access(CTR, os.X_OK):
        ctr = subprocess.run([CTR, "--version"], capture_output=True, text=True, timeout=10)
        out["ctr"] = ctr.stdout.strip()
    return out


# ---- one exec --------------------------------------------------------------------

class Cli:
    """A CLI exec, stdio on /dev/null but stderr in a file, read only when it failed."""

    def __init__(self, method: str, argv: Callable[[], list[str]], env: dict[str, str], log: str,
                 failures: Failures) -> None:
        self.method, self.argv, self.env, self.failures = method, argv, env, failures
        self.log = open(log, "w+b")  # noqa: SIM115 - closed by close()

    def __call__(self) -> None:
        self.log.seek(0)
        self.log.truncate()
        cmd = self.argv()
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
                            env=self.env).returncode
        if rc != 0:
            self.log.seek(0)
            said = self.log.read().decode(errors="replace").strip()[-300:]
            self.failures.add(self.method, f"{' '.join(cmd[-4:])}: exit code {rc}: {said}")

    def close(self) -> None:
        self.log.close()


# ---- turns -----------------------------------------------------------------------

def take_turns(execs: dict[str, Callable[[], None]], counts: dict[str, int], turns: dict[str, int],
               watched: dict[str, dict[str, list[psutil.Process]]]) -> tuple[dict, dict]:
    """counts[m] timed execs of each method, turns[m] at a time, in rotating order.

    Around each turn, the CPU of every watched group of processes (warmexec's tree, the
    engine's daemons) and the bench's own and its reaped children's. Returns the samples
    (ns) and, per method, CPU seconds by part summed over its turns (with "wall" and
    "vanished")."""
    samples: dict[str, list[int]] = {m: [] for m in execs}
    cpu: dict[str, dict[str, float]] = {m: {} for m in execs}
    for r in itertools.count():
        left = [m for m in execs if len(samples[m]) < counts[m]]
        if not left:
            break
        for m in left[r % len(left):] + left[:r % len(left)]:
            k = min(turns[m], counts[m] - len(samples[m]))
            before = {g: cpu_snapshot(procs) for g, procs in watched.items()}
            self0, kids0, t0 = self_cpu(), _children_cpu(), time.perf_counter()
            once = execs[m]
            for _ in range(k):
                t = time.perf_counter_ns()
                once()
                samples[m].append(time.perf_counter_ns() - t)
            parts = {"wall": time.perf_counter() - t0, "cli": _children_cpu() - kids0,
                     "client": self_cpu() - self0}
            for g, procs in watched.items():
                by_part, lost = cpu_delta(before[g], cpu_snapshot(procs))
                if g == "engine":
                    by_part[REAPED] = by_part.pop("commands")
                parts.update(by_part)
                parts["vanished"] = parts.get("vanished", 0) + lost
            for part, v in parts.items():
                cpu[m][part] = cpu[m].get(part, 0.0) + v
    return samples, cpu


def cpu_per(unit: str, exec_side_parts: tuple[str, ...], n: int, cpu: dict[str, float]) -> dict:
    """One method's CPU in ms per unit ("exec", "call"): its exec side by part, the
    client, and what else ran meanwhile."""
    ms = lambda v: round(v * 1e3 / (n or 1), 4)
    exec_side = round(sum(cpu.get(p, 0.0) for p in exec_side_parts) * 1e3 / (n or 1), 3)
    client = ms(cpu.get("client", 0.0))
    return {f"{unit}s": n, "wall_s": round(cpu.get("wall", 0.0), 3), f"exec_side_ms_per_{unit}": exec_side,
            f"client_ms_per_{unit}": client, f"total_ms_per_{unit}": round(exec_side + client, 3),
            f"by_part_ms_per_{unit}": {p: ms(cpu.get(p, 0.0)) for p in exec_side_parts},
            f"meanwhile_ms_per_{unit}": {p: ms(v) for p, v in cpu.items()
                                         if p not in (*exec_side_parts, "wall", "client", "vanished", "cli")},
            "vanished": int(cpu.get("vanished", 0))}


def latency_row(ns: list[int]) -> dict:
    s = sorted(ns)
    return {"n": len(s), **{f"p{q:g}_ms": round(percentile(s, q), 3) for q in PERCENTILES},
            "mean_ms": round(sum(s) / len(s) / 1e6, 3) if s else None}


def summarize(samples: dict[str, list[int]], cpu: dict[str, dict[str, float]]) -> dict:
    """Latency percentiles, CPU per exec by part, and each as a multiple of warmexec's."""
    latency, per_exec = {}, {}
    for m, ns in samples.items():
        latency[m] = latency_row(ns)
        per_exec[m] = cpu_per("exec", EXEC_SIDE[m], len(ns), cpu[m])
    we_lat, we_cpu = latency["warmexec"], per_exec["warmexec"]
    for row in latency.values():
        row["p50_vs_warmexec"] = ratio(row["p50_ms"], we_lat["p50_ms"], 2)
    cpu_ratio = lambda m, key: ratio(per_exec[m][key], we_cpu[key], 2)
    ratios = {m: {"p50": latency[m]["p50_vs_warmexec"],
                  "p90": ratio(latency[m]["p90_ms"], we_lat["p90_ms"], 2),
                  "cpu_exec_side": cpu_ratio(m, "exec_side_ms_per_exec"),
                  "cpu_with_client": cpu_ratio(m, "total_ms_per_exec")}
              for m in latency if m != "warmexec"}
    # what the engine burns while only warmexec execs, as % of one core
    engine_idle = sum(v for p, v in cpu["warmexec"].items() if p in EXEC_SIDE["docker exec"] and p != "cli")
    wall = cpu["warmexec"].get("wall")
    return {"latency": latency, "cpu": per_exec, "ratios": ratios,
            "engine_idle_pct": round(100 * engine_idle / wall, 2) if wall else None}


# ---- the part --------------------------------------------------------------------

def _measure(box: DockerBox, workdir: str, c: Counts, failures: Failures, out: dict, t0: float) -> None:
    """Fills out as it goes: what was found before a failure stays. t0: when the part began."""
    out.update(versions=engine_versions(box), dockerd_start_s=round(box.start_seconds, 2))
    containerd = containerd_of(box)
    address = out["containerd_address"] = containerd_address(containerd, box)
    sup = start_supervisor(box.runc_root, workdir, config=f'docker_host = "{box.host}"\n')
    client = Client(sup.endpoint)
    clis: list[Cli] = []
    try:
        cid = box.run("bench-engine")
        out["container"] = cid[:12]
        try:
            wait_ready(client, cid, READY_TIMEOUT)
        except AssertionError as exc:
            raise BenchError(f"{exc}; containers: {client.list()}") from None
        shim = psutil.Process(int(box.inspect(cid)["State"]["Pid"])).parent()
        out["setup_s"] = round(time.monotonic() - t0, 1)  # dockerd, image, a test run, ours READY
        execs: dict[str, Callable[[], None]] = {"warmexec": lambda: warmexec_once(client, cid, failures)}
        clis.append(Cli("docker exec", lambda: [DOCKER, "-H", box.host, "exec", cid, "true"], box.env,
                        os.path.join(workdir, "docker-exec.err"), failures))
        execs["docker exec"] = clis[-1]
        if os.access(CTR, os.X_OK):
            fifo_dir = os.path.join(box.dir, "ctr-fifo")
            os.makedirs(fifo_dir, exist_ok=True)
            ids = (f"bench-{os.getpid()}-{i}" for i in itertools.count())
            clis.append(Cli("ctr exec", lambda: [CTR, "--address", address, "-n", "moby", "task", "exec",
                                                 "--fifo-dir", fifo_dir, "--exec-id", next(ids), cid, "true"],
                            box.env, os.path.join(workdir, "ctr-exec.err"), failures))
            execs["ctr exec"] = clis[-1]
        else:
            out["notes"].append(f"{CTR} not found (Debian's containerd package): no ctr exec")
        for m, once in execs.items():
            for _ in range(WARMUP_FAST if m == "warmexec" else WARMUP_SLOW):
                once()
        watched = {"warmexec": tree(sup.proc.pid),
                   "engine": {"dockerd": [psutil.Process(box.proc.pid)], "containerd": [containerd],
                              "shim": [shim]}}
        counts = {m: c.engine_fast if m == "warmexec" else c.engine_slow for m in execs}
        turns = {m: max(1, TURN * c.engine_fast // c.engine_slow) if m == "warmexec" else TURN for m in execs}
        t1 = time.monotonic()
        samples, cpu = take_turns(execs, counts, turns, watched)
        out["measure_s"] = round(time.monotonic() - t1, 1)
    except BaseException:
        out["supervisor_log"] = sup.read_log()[-2000:]
        raise
    finally:
        for cli in clis:
            cli.close()
        client.close()
        out["supervisor_exit"] = sup.stop()
    out.update(summarize(samples, cpu))
    out["samples_ns"] = samples
