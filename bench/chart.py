"""bench/out/latency.png: latency CDFs, throughput curves and the scale results.

The latency panel has the engine part's methods too (docker exec, ctr exec, and
warmexec on the same Docker container, dashed), and the CRI part's ExecSync through
``warmexec cri`` and containerd directly (dotted), when they ran.

matplotlib is optional (``pip install '.[bench]'``): without it the chart is skipped
with a message, and the rest of the bench is unaffected.
"""

from __future__ import annotations

import os

COLORS = {"warmexec": "tab:blue", "runc exec": "tab:red", "nsenter": "tab:orange", "floor": "tab:green",
          "zmq ping": "tab:gray", "docker exec": "tab:purple", "ctr exec": "tab:brown",
          "warmexec cri": "tab:cyan", "containerd direct": "tab:olive"}


def write_chart(path: str, doc: dict) -> str | None:
    """Write the PNG; its path, or None (and a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart: matplotlib is not installed (pip install '.[bench]'); no PNG written")
        return None
    scale = (doc.get("scale") or {}).get("points")
    engines = (doc.get("engines") or {}).get("samples_ns")
    cri = (doc.get("cri") or {}).get("samples_ns")
    fig, axes = plt.subplots(1, 3 if scale else 2,
                             figsize=(18 if scale else 12, 5.6 if engines or cri else 5))
    _latency(axes[0], doc["samples_ns"], doc["containers"], engines, cri)
    _throughput(axes[1], doc["throughput"])
    if scale:
        _scale(axes[2], scale)
    machine = doc["machine"]
    fig.suptitle(f"warmexec bench: {machine['nproc']} CPUs ({machine['cpu_model']}), "
                 f"kernel {machine['kernel']}, {machine['runc']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(ax, samples: dict[str, list[int]], containers: int,
             engines: dict[str, list[int]] | None = None, cri: dict[str, list[int]] | None = None) -> None:
    lines = [(m, ns, m, "-") for m, ns in samples.items()]
    for m, ns in (engines or {}).items():  # the Docker container's: warmexec dashed beside its runc line
        we = m == "warmexec"
        lines.append((m, ns, "warmexec, Docker container" if we else m, "--" if we else "-"))
    for m, ns in (cri or {}).items():  # CRI ExecSync on a containerd pod's container, dotted
        lines.append((m, ns, f"ExecSync, {m}", ":"))
    for method, ns, label, style in lines:
        if not ns:
            continue
        xs = sorted(v / 1e6 for v in ns)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})", color=COLORS.get(method), ls=style)
    ax.set_xscale("log")
    ax.set_xlabel("latency of one exec of `true`, ms (log)")
    ax.set_ylabel("fraction of execs")
    where = f"{containers} runc containers" + ("; engines: one Docker container" if engines else "")
    ax.set_title(f"latency CDF, one at a time, {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if engines or cri:  # up to ten lines: below the panel, where they hide none of them
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=7.5)
    else:
        ax.legend(loc="best", fontsize=9)


def _throughput(ax, rows: list[dict]) -> None:
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["inflight"], r["execs_per_s"]) for r in rows
               if r["method"] == method and not r.get("skipped")]
        ax.plot(*zip(*pts), marker="o", label=method, color=COLORS.get(method))
        for x, y in pts:
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
    ax.set_xscale("log", base=2)
    ks = sorted({r["inflight"] for r in rows})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("execs in flight (log)")
    ax.set_ylabel("execs of `true` per second (log)")
    ax.set_title("throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right")


def _scale(ax, points: list[dict]) -> None:
    ns = [p["containers"] for p in points]
    ax.plot(ns, [p["latency"]["p50_ms"] for p in points], marker="o", color="tab:blue", label="p50 latency")
    ax.plot(ns, [p["latency"]["p99_ms"] for p in points], marker=".", ls="--", color="tab:blue",
            label="p99 latency")
    ax.plot(ns, [p["latency_one"]["p50_ms"] for p in points], marker="x", ls=":", color="tab:cyan",
            label="p50, one container (rest warm)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("warm containers (log)")
    ax.set_ylabel("exec latency, ms", color="tab:blue")
    ax.set_ylim(bottom=0)
    mem = ax.twinx()
    mem.plot(ns, [p["memory"]["per_container_pss_mib_p50"] for p in points], marker="s", color="tab:purple",
             label="PSS per container")
    mem.plot(ns, [(p["memory"]["supervisor"] or {}).get("rss_mib") for p in points], marker="^",
             color="tab:gray", label="supervisor RSS")
    mem.set_ylabel("MiB")
    mem.set_ylim(bottom=0)
    ax.set_title("at scale: latency (round-robin over all; one), memory")
    lines = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="best", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
