"""The human-readable report; the JSON file has the same numbers and the raw samples."""

from __future__ import annotations

import sys

from bench.common import Failures
from bench.streams import print_streams

WARMUP_ROWS = (("state_to_ready", "state.json written -> worker READY"),
               ("run_to_ready", "runc run -d started -> worker READY"),
               ("runc_run", "runc run -d started -> returned"),
               ("wait_after_run", "runc run -d returned -> READY (0: before)"),
               ("first_exec", "first exec of `true` (READY, runc returned)"),
               ("run_returned_to_exec_done", "runc run -d returned -> first exec done"))


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def print_latency(summary: dict[str, dict], containers: int) -> None:
    print(f"\nexec latency of `true`, ms ({containers} containers round-robin, one exec at a time)")
    head = "{:<10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}"
    print(head.format("method", "n", "p50", "p90", "p99", "p99.9", "p50/runc", "p50/floor"))
    for method, r in summary.items():
        print(f"{method:<10} {r['n']:>6} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['p99.9_ms']:>8.3f} {_ratio(r['p50_vs_runc']):>9} {_ratio(r['p50_vs_floor']):>10}")
    print("(nsenter joins namespaces only, not cgroups; floor = posix_spawn+waitpid from inside;")
    print(" zmq ping = warmexec's ping request: the ZeroMQ round trip alone, no exec)")


def print_throughput(rows: list[dict], containers: int | None) -> None:
    print(f"\nthroughput of `true` over {containers} containers (warmexec: one client, pipelined; "
          "floor: spawn loops side by side; runc exec: parallel subprocesses)")
    print("{:<10} {:>9} {:>7} {:>9} {:>10} {:>11}  {}".format(
        "method", "in flight", "execs", "seconds", "execs/s", "CPU ms/exec", "by part"))
    for r in rows:
        if r.get("skipped"):
            print(f"{r['method']:<10} {r['inflight']:>9}  skipped: predicted over the time budget")
            continue
        parts = r.get("cpu_ms_per_exec_by_part") or {}
        by_part = ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) if len(parts) > 1 else ""
        print(f"{r['method']:<10} {r['inflight']:>9} {r['execs']:>7} {r['seconds']:>9.3f} "
              f"{r['execs_per_s']:>10.1f} {_num(r.get('cpu_ms_per_exec'), '.3f'):>11}  {by_part}")


def print_cpu(cpu: dict) -> None:
    we, runc = cpu["warmexec"], cpu["runc exec"]
    print("\nCPU seconds per 1000 sequential execs of `true`")
    print("{:<10} {:>6} {:>12} {:>8} {:>8}".format("method", "execs", "exec side", "client", "total"))
    for name, r in (("warmexec", we), ("runc exec", runc)):
        total = r["cpu_per_1000_s"] + r["client_per_1000_s"]
        print(f"{name:<10} {r['execs']:>6} {r['cpu_per_1000_s']:>12.3f} {r['client_per_1000_s']:>8.3f} "
              f"{total:>8.3f}")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in we["by_part_per_1000_s"].items())
    print(f"warmexec exec side: {parts}")
    print(f"runc exec / warmexec: {_ratio(cpu['runc_vs_warmexec'])} exec side, "
          f"{_ratio(cpu['runc_vs_warmexec_with_client'])} with the client")
    if we["vanished"]:
        print(f"(warning: {we['vanished']} warmexec processes exited during the batch; their CPU is missing)")


def print_scale(scale: dict) -> None:
    print("\nwarm containers: warmexec memory (MiB), idle CPU, exec latency round-robin over all")
    head = "{:>5} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>6} {:>6} {:>7} {:>7} {:>10} {:>8} {:>8}"
    print(head.format("ctrs", "sup RSS", "sup USS", "sup PSS", "zyg PSS", "ctr USS", "ctr PSS",
                      "total PSS", "fds", "idle%", "p50 ms", "p99 ms", "p50/p50(1)", "one p50", "ratio"))
    for p in scale["points"]:
        m, sup, zyg = p["memory"], p["memory"]["supervisor"] or {}, p["memory"]["zygote"] or {}
        print(f"{p['containers']:>5} {_num(sup.get('rss_mib')):>7} {_num(sup.get('uss_mib')):>7} "
              f"{_num(sup.get('pss_mib')):>7} {_num(zyg.get('pss_mib')):>7} "
              f"{_num(m['per_container_uss_mib_p50']):>8} {_num(m['per_container_pss_mib_p50']):>8} "
              f"{_num(m['total_pss_mib'], '.1f'):>9} {m['supervisor_fds']:>6} {p['idle']['cpu_pct']:>6.2f} "
              f"{p['latency']['p50_ms']:>7.3f} {p['latency']['p99_ms']:>7.3f} "
              f"{_ratio(p['latency']['p50_vs_first']):>10} {p['latency_one']['p50_ms']:>8.3f} "
              f"{_ratio(p['latency_one']['p50_vs_first']):>8}")
    print("(ctr = median per container: its worker(s); total PSS = supervisor + zygote + all workers;")
    print(" p50/p99: round-robin over all containers; one p50: into the first one alone, the rest warm)")
    print("{:>5} {:>9} {:>12} {:>14}".format("ctrs", "start s", "all READY s", "first execs s"))
    for p in scale["points"]:
        print(f"{p['containers']:>5} {p['start_s']:>9.2f} {p['all_ready_s']:>12.2f} "
              f"{p['first_execs_s']:>14.2f}")
    for note in scale["notes"]:
        print(f"note: {note}")


def print_warmup(warm: dict) -> None:
    if not warm.get("n"):
        return
    print(f"\nwarm-up of a new container, ms ({warm['n']} containers started one at a time, "
          "READY polled every 2 ms)")
    print("{:<46} {:>8} {:>8}".format("", "p50", "p95"))
    for key, label in WARMUP_ROWS:
        print(f"{label:<46} {warm[key]['p50_ms']:>8.2f} {warm[key]['p95_ms']:>8.2f}")


def print_engines(eng: dict) -> None:
    if "latency" not in eng:
        what = f"failed: {eng['error']}" if eng.get("error") else f"skipped: {eng.get('skipped')}"
        print(f"\nengines (docker exec, ctr exec): {what}")
        return
    v = eng["versions"]
    print(f"\nengines: one exec of `true` at a time on one Docker container (private dockerd "
          f"{v.get('docker')}, containerd {v.get('containerd')}, runc {v.get('runc')}), taking turns")
    head = "{:<11} {:>5} {:>8} {:>8} {:>8} {:>10} {:>11} {:>8} {:>8} {:>10}"
    print(head.format("method", "n", "p50", "p90", "p99", "p50/we", "CPU ms/exec", "client", "total",
                      "total/we"))
    for m, r in eng["latency"].items():
        c, q = eng["cpu"][m], eng["ratios"].get(m, {"cpu_with_client": 1.0})
        print(f"{m:<11} {r['n']:>5} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{_ratio(r['p50_vs_warmexec']):>10} {c['exec_side_ms_per_exec']:>11.3f} "
              f"{c['client_ms_per_exec']:>8.3f} {c['total_ms_per_exec']:>8.3f} "
              f"{_ratio(q['cpu_with_client']):>10}")
    for m, c in eng["cpu"].items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in c["by_part_ms_per_exec"].items())
        others = ", ".join(f"{k} {v:.3f}" for k, v in c["meanwhile_ms_per_exec"].items() if v)
        print(f"{m} CPU ms/exec: {parts}" + (f"  (meanwhile, not counted: {others})" if others else ""))
    for m, q in eng["ratios"].items():
        print(f"{m} / warmexec: p50 {_ratio(q['p50'])}, CPU {_ratio(q['cpu_exec_side'])} exec side, "
              f"{_ratio(q['cpu_with_client'])} with the client")
    print("(CPU ms/exec: warmexec's process tree; for docker and ctr the CLI, dockerd, containerd, the shim")
    print(f" and what they reaped (runc, runc init, the command); client = the bench process; engine idle "
          f"{_num(eng.get('engine_idle_pct'))}% of a core)")
    print(f"engine part {eng['seconds']:.1f} s (engine up, container READY {eng['setup_s']:.1f} s, "
          f"turns {eng['measure_s']:.1f} s, clean-up {eng['cleanup_s']:.1f} s); "
          f"containerd at {eng['containerd_address']}")
    for note in eng.get("notes", []):
        print(f"note: {note}")


def print_cri(cri: dict) -> None:
    if "latency" not in cri:
        what = f"failed: {cri['error']}" if cri.get("error") else f"skipped: {cri.get('skipped')}"
        print(f"\nCRI ExecSync (warmexec cri, containerd): {what}")
        return
    print(f"\nCRI ExecSync of `true`, one call at a time on one container of a CRI pod (private containerd "
          f"{cri['containerd_version']}, CRI {cri['runtime_api']}), taking turns")
    head = "{:<18} {:>5} {:>8} {:>8} {:>8} {:>11} {:>8} {:>8}"
    print(head.format("path", "n", "p50", "p90", "p99", "CPU ms/call", "client", "total"))
    for m, r in cri["latency"].items():
        c = cri["cpu"][m]
        print(f"{m:<18} {r['n']:>5} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{c['exec_side_ms_per_call']:>11.3f} {c['client_ms_per_call']:>8.3f} "
              f"{c['total_ms_per_call']:>8.3f}")
    for m, c in cri["cpu"].items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in c["by_part_ms_per_call"].items())
        others = ", ".join(f"{k} {v:.3f}" for k, v in c["meanwhile_ms_per_call"].items() if v)
        print(f"{m} CPU ms/call: {parts}" + (f"  (meanwhile, not counted: {others})" if others else ""))
    q = cri["ratios_containerd_vs_proxy"]
    print(f"containerd direct / warmexec cri: p50 {_ratio(q['p50'])}, p99 {_ratio(q['p99'])}, "
          f"CPU {_ratio(q['cpu_exec_side'])} exec side, {_ratio(q['cpu_with_client'])} with the client "
          "(issue 13's target: 10x)")
    w = cri["warm_path"]
    print(f"warm path: the supervisor ran {w['supervisor_execs']} execs for {w['proxy_calls']} ExecSyncs "
          f"through warmexec cri ({w['direct_calls']} direct calls beside them): "
          + ("ok, every proxied call answered by warmexec" if w["ok"] else "MISMATCH"))
    print("(CPU ms/call: warmexec cri = the proxy process, the supervisor's tree and the commands;")
    print(" containerd direct = containerd, the pod's shim and what they reaped (runc, runc init, the")
    print(" command); client = the bench process's gRPC client)")
    print(f"CRI part {cri['seconds']:.1f} s (containerd, image, pod, container, ours READY "
          f"{cri['setup_s']:.1f} s, "
          f"turns {cri['measure_s']:.1f} s, clean-up {cri['cleanup_s']:.1f} s)")
    for note in cri.get("notes", []):
        print(f"note: {note}")


def print_report(doc: dict, failures: Failures) -> None:
    print_latency(doc["latency"], doc["containers"])
    print_throughput(doc["throughput"], doc.get("tput_containers"))
    print_cpu(doc["cpu"])
    if doc.get("streams"):
        print_streams(doc["streams"])
    if doc.get("scale"):
        print_scale(doc["scale"])
    print_warmup(doc.get("warmup", {}))
    if doc.get("engines"):
        print_engines(doc["engines"])
    if doc.get("cri"):
        print_cri(doc["cri"])
    if failures.total():
        print(f"\nFAILED execs: {dict(failures.count)}", file=sys.stderr)
        for line in failures.examples:
            print(f"  {line}", file=sys.stderr)
