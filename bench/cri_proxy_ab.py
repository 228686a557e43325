"""CPU and latency of ``warmexec cri``'s ExecSync fast path alone, two proxies A/B in the
same minutes (``python -m bench.cri_proxy_ab --a CMD --b CMD``).

No containerd: a runc busybox container with containerd's CRI annotations
(:class:`bench.runcbox.RuncBox`), one ``warmexec serve`` watching it, and a stand-in
runtime that only answers Version (``containerd``). Each proxy command (``A`` and ``B``,
default both this tree's ``python -m warmexec.supervisor.cli``) listens on a socket of its
own in front of it; the bench process calls ExecSync of ``true`` through a generated CRI
stub, ROUNDS rounds of CALLS calls on each, in alternating order. Reported per proxy:
its process's CPU per call (user + system, all its threads, from /proc through psutil)
and the calls' p50, each the median over the rounds, and B's as a fraction of A's.
What the supervisor and the commands cost is the same for both and is not counted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil

from bench import cri_stubs
from bench.harness import SupervisorProcess, wait_for, wait_ready
from bench.runcbox import RuncBox
from warmexec.protocol.client import Client

ANNOTATIONS = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.container-name": "app",
               "io.kubernetes.cri.sandbox-name": "ab-0", "io.kubernetes.cri.sandbox-namespace": "bench"}
HERE = f"{sys.executable} -m warmexec.supervisor.cli"


class VersionOnly(grpc.GenericRpcHandler):
    def service(self, details):
        return grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"\x12\x0acontainerd")


def one_round(stub, pb, cid: str, proc: psutil.Process, calls: int) -> tuple[float, float]:
    """(proxy CPU ms per call, p50 ms) of calls ExecSyncs of true."""
    request = pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=0)
    lat = []
    t = proc.cpu_times()
    cpu0 = t.user + t.system
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        r = stub.ExecSync(request, timeout=30)
        lat.append(time.perf_counter_ns() - t0)
        assert r.exit_code == 0
    t = proc.cpu_times()
    return (t.user + t.system - cpu0) * 1000 / calls, statistics.median(lat) / 1e6


def direct_round(client: Client, cid: str, calls: int) -> float:
    """p50 ms of calls execs of true straight to the supervisor: what the proxy adds to."""
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        assert client.exec(cid, ["true"])["exit_code"] == 0
        lat.append(time.perf_counter_ns() - t0)
    return statistics.median(lat) / 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default=HERE, help="proxy A's command, before 'cri --listen ...'")
    p.add_argument("--b", default=HERE)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args()
    stubs = cri_stubs.load()
    work = tempfile.mkdtemp(prefix="we-cri-ab-")
    box = RuncBox()
    procs: dict[str, subprocess.Popen] = {}
    runtime = grpc.server(ThreadPoolExecutor(2))
    try:
        runtime.add_generic_rpc_handlers((VersionOnly(),))
        runtime.add_insecure_port(f"unix://{work}/runtime.sock")
        runtime.start()
        sup = SupervisorProcess(box.root, work, config='docker_host = ""\n', metrics=False,
                                log_level="WARNING")
        cfg = box.config()
        cfg["annotations"] = dict(ANNOTATIONS)
        cid = box.run("ab", cfg)
        with Client(sup.endpoint) as c:
            wait_ready(c, cid)
        stubs_by = {}
        for name, cmd in (("A", args.a), ("B", args.b)):
            listen = f"unix://{work}/{name}.sock"
            procs[name] = subprocess.Popen([*shlex.split(cmd), "cri", "--listen", listen, "--upstream",
                                            f"unix://{work}/runtime.sock", "--endpoint", sup.endpoint,
                                            "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
            wait_for(lambda path=listen[len("unix://"):]: os.path.exists(path), 15, f"proxy {name} to listen")
            stubs_by[name] = stubs.rpc.RuntimeServiceStub(cri_stubs.channel(listen))
        for name, stub in stubs_by.items():  # warm both: the first list, the channels
            wait_for(lambda s=stub: _ok(s, stubs.pb, cid), 15, f"proxy {name} to serve the container")
            one_round(stub, stubs.pb, cid, psutil.Process(procs[name].pid), 50)
        results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
        direct: list[float] = []
        with Client(sup.endpoint) as c:
            for i in range(args.rounds):
                for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    results[name].append(one_round(stubs_by[name], stubs.pb, cid,
                                                   psutil.Process(procs[name].pid), args.calls))
                direct.append(direct_round(c, cid, args.calls))
        med = {n: (statistics.median(c for c, _ in r), statistics.median(lat for _, lat in r))
               for n, r in results.items()}
        for n in ("A", "B"):
            rounds = " ".join(f"{c:.3f}" for c, _ in results[n])
            print(f"{n}: proxy CPU {med[n][0]:.3f} ms/call (rounds: {rounds}), p50 {med[n][1]:.3f} ms")
        print(f"direct (warmexec Client, no proxy): p50 {statistics.median(direct):.3f} ms")
        print(f"B/A: CPU {med['B'][0] / med['A'][0]:.2f}, p50 {med['B'][1] / med['A'][1]:.2f}")
        sup.stop()
        return 0
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)
        runtime.stop(0)
        box.cleanup()


def _ok(stub, pb, cid: str) -> bool:
    try:
        return stub.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"]), timeout=5).exit_code == 0
    except grpc.RpcError:
        return False


if __name__ == "__main__":
    sys.exit(main())
