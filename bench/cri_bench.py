"""CRI ExecSync through ``warmexec cri`` against containerd's own, on one CRI container.

A private containerd 1.6 with its CRI plugin (:class:`bench.cribox.CriBox`) runs one
host-network pod with one busybox container; a ``warmexec serve`` watches its runc root
(``docker_host = ""``), and ``warmexec cri --listen unix://<tmp>/cri.sock --upstream
<containerd's socket> --endpoint <the supervisor>`` runs in front of it, started as
tests/system/test_cri_parity.py starts it. On that container, one ExecSync of ``true``
at a time, with the generated CRI stubs (:mod:`bench.cri_stubs`), through:

* warmexec cri      - the proxy's socket: decoded there and run by the container's warm
  worker;
* containerd direct - containerd's CRI socket: the CRI plugin, the container's shim,
  ``runc exec``.

The two take turns, TURN calls at a time in rotating order, as in :mod:`bench.engines`,
with CPU counted around every turn (``engines.take_turns``):

* warmexec cri: the ``warmexec cri`` process (all its threads) and the supervisor's
  whole tree (supervisor, zygote, workers, the commands they reaped), counted as
  :mod:`bench.resources` counts it;
* containerd direct: containerd, the pod's shim(s) (the runc v2 shim serves the pod's
  sandbox and its containers) and what they reaped: ``runc exec``, its ``runc init``
  stages and the command, as :mod:`bench.engines` counts ``ctr exec``.

The bench process's own CPU (the Python gRPC client) is reported beside both as the
client's; what one side spends during the other's turns is kept as "meanwhile".

The proxy path is checked to be warmexec's: the supervisor's
``warmexec_exec_exits_total`` (its metrics endpoint, scraped before and after the turns
only) must grow by exactly the number of ExecSyncs sent through the proxy, none of
containerd's direct calls included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import psutil

from bench.common import BenchError, Counts, Failures, ratio
from bench.engines import REAPED, TURN, cpu_per, latency_row, measured, take_turns
from bench.harness import SupervisorProcess, wait_for, wait_ready
from warmexec.protocol.client import Client

PROXY, DIRECT = "warmexec cri", "containerd direct"
EXEC_SIDE = {PROXY: ("cri proxy", "supervisor", "zygote", "workers", "commands"),
             DIRECT: ("containerd", "shim", REAPED)}
WARMUP = 5  # untimed ExecSyncs per path first
READY_TIMEOUT = 30.0
RPC_TIMEOUT = 30.0  # seconds: an ExecSync not answered by then is a failure


def measure_cri(workdir: str, c: Counts, failures: Failures) -> dict:
    """The CRI part: {"skipped": why} when no private containerd with CRI runs here, with
    "error" when it failed once started (the rest of the bench goes on either way)."""
    t0 = time.monotonic()
    if not c.cri:
        return {"skipped": "--n-cri 0"}
    try:
        from bench.cribox import CriBox, CriUnavailable
    except ImportError as exc:
        return {"skipped": f"bench.cribox cannot be imported: {exc}"}
    try:
        box = CriBox()
    except CriUnavailable as exc:
        return {"skipped": f"no private containerd with CRI on this host: {str(exc)[:1500]}",
                "seconds": round(time.monotonic() - t0, 1)}
    out: dict = {"notes": [], "timings_s": {k: round(v, 2) for k, v in box.timings.items()}}
    return measured(box, lambda: _measure(box, workdir, c, failures, out, t0), out, "containerd_log", t0)


def execs_run(sup: SupervisorProcess) -> float:
    """How many execs the supervisor ran (its exec exit counter, summed), as
    tests/system/test_cri_parity.py reads it."""
    url = f"http://127.0.0.1:{sup.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("warmexec_exec_exits_total"))


class ExecSync:
    """One ExecSync of ``true`` on a stub; a non-zero exit or an RpcError is a failure."""

    def __init__(self, method: str, stub, box, failures: Failures) -> None:
        self.method, self.stub, self.failures = method, stub, failures
        self.request = box.pb.ExecSyncRequest(container_id=box.container_id, cmd=["true"], timeout=0)

    def __call__(self) -> None:
        import grpc
        try:
            r = self.stub.ExecSync(self.request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            self.failures.add(self.method, f"{exc.code().name}: {exc.details()}"[:300])
            return
        if r.exit_code != 0:
            self.failures.add(self.method, f"exit code {r.exit_code}: {r.stderr[-200:]!r}")


def shims_of(box) -> list[psutil.Process]:
    """The shim(s) of the pod: the parents of the container's and the sandbox's inits."""
    shims: dict[int, psutil.Process] = {}
    for cid in (box.container_id, box.pod_id):
        try:
            parent = psutil.Process(box.init_pid(cid)).parent()
        except (OSError, KeyError, psutil.Error):
            continue
        if parent is not None:
            shims[parent.pid] = parent
    if not shims:
        raise BenchError("the pod's shim was not found")
    return list(shims.values())


def _measure(box, workdir: str, c: Counts, failures: Failures, out: dict, t0: float) -> None:
    """Fills out as it goes: what was found before a failure stays. t0: when the part began."""
    from bench import cri_stubs
    containerd = psutil.Process(box.proc.pid)  # unshare and sh exec containerd in the same pid
    if containerd.name() != "containerd":
        raise BenchError(f"pid {box.proc.pid} is {containerd.name()}, not containerd")
    out.update(containerd_version=box.version.runtime_version, runtime_api=box.version.runtime_api_version,
               container=box.container_id[:12], pod=box.pod_id[:12])
    os.makedirs(workdir, exist_ok=True)
    try:  # metrics on: the warm-path check reads the exec counter
        sup = SupervisorProcess(box.runc_root, workdir, config='docker_host = ""\n', log_level="WARNING")
    except AssertionError as exc:
        raise BenchError(str(exc)) from None
    listen = f"unix://{workdir}/cri.sock"
    proc = subprocess.Popen([sys.executable, "-m", "warmexec.supervisor.cli", "cri", "--listen", listen,
                             "--upstream", box.socket, "--endpoint", sup.endpoint],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = None
    try:
        with Client(sup.endpoint) as client:
            try:
                wait_ready(client, box.container_id, READY_TIMEOUT)
            except AssertionError as exc:
                raise BenchError(f"{exc}; containers: {client.list()}") from None
        try:
            wait_for(lambda: proc.poll() is not None or os.path.exists(listen[len("unix://"):]), 15,
                     "warmexec cri to listen")
        except AssertionError as exc:
            raise BenchError(str(exc)) from None
        if proc.poll() is not None:
            raise BenchError(f"warmexec cri exited {proc.returncode}")
        out["setup_s"] = round(time.monotonic() - t0, 1)  # containerd, image, pod, container, ours READY
        channel = cri_stubs.channel(listen)
        execs: dict[str, Callable[[], None]] = {
            PROXY: ExecSync(PROXY, box.stubs.rpc.RuntimeServiceStub(channel), box, failures),
            DIRECT: ExecSync(DIRECT, box.runtime, box, failures)}
        for once in execs.values():
            for _ in range(WARMUP):
                once()
        shims = shims_of(box)
        out["shims"] = len(shims)
        watched = {"warmexec": {"cri proxy": [psutil.Process(proc.pid)], **_tree(sup.proc.pid)},
                   "engine": {"containerd": [containerd], "shim": shims}}
        counts = dict.fromkeys(execs, c.cri)
        turns = dict.fromkeys(execs, TURN)
        before = execs_run(sup)
        t1 = time.monotonic()
        samples, cpu = take_turns(execs, counts, turns, watched)
        out["measure_s"] = round(time.monotonic() - t1, 1)
        ran = execs_run(sup) - before
        sent = len(samples[PROXY])
        out["warm_path"] = {"proxy_calls": sent, "direct_calls": len(samples[DIRECT]),
                            "supervisor_execs": int(ran), "ok": ran == sent}
        if ran != sent:
            failures.add(PROXY, f"the supervisor ran {ran:g} execs for {sent} ExecSyncs through the proxy "
                                f"(and {len(samples[DIRECT])} direct)")
        if proc.poll() is not None:
            raise BenchError(f"warmexec cri exited {proc.returncode} during the turns")
    except BaseException:
        out["supervisor_log"] = sup.read_log()[-2000:]
        raise
    finally:
        if channel is not None:
            channel.close()
        proc.terminate()
        try:
            out["cri_exit"] = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["cri_exit"] = proc.wait()
        out["supervisor_exit"] = sup.stop()
    out.update(summarize(samples, cpu))
    out["samples_ns"] = samples


def _tree(sup_pid: int) -> dict[str, list[psutil.Process]]:
    from bench.resources import tree
    return tree(sup_pid)


def summarize(samples: dict[str, list[int]], cpu: dict[str, dict[str, float]]) -> dict:
    """Latency percentiles, CPU per call by part, containerd's as a multiple of the proxy's."""
    latency, per_call = {}, {}
    for m, ns in samples.items():
        latency[m] = latency_row(ns)
        per_call[m] = cpu_per("call", EXEC_SIDE[m], len(ns), cpu[m])
    d, p = latency[DIRECT], latency[PROXY]
    cd, cp = per_call[DIRECT], per_call[PROXY]
    ratios = {"p50": ratio(d["p50_ms"], p["p50_ms"], 2), "p90": ratio(d["p90_ms"], p["p90_ms"], 2),
              "p99": ratio(d["p99_ms"], p["p99_ms"], 2),
              "cpu_exec_side": ratio(cd["exec_side_ms_per_call"], cp["exec_side_ms_per_call"], 2),
              "cpu_with_client": ratio(cd["total_ms_per_call"], cp["total_ms_per_call"], 2)}
    return {"latency": latency, "cpu": per_call, "ratios_containerd_vs_proxy": ratios}
