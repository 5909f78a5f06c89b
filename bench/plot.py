"""The report's PNG: warm-call latency distributions, scale-out, and pool bookkeeping at scale."""

from __future__ import annotations

from typing import Any

from bench.report import get

P = dict[str, Any]


def render(report: P, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["measurements"]
    fig, (left, right, sim_ax) = plt.subplots(1, 3, figsize=(19, 5))
    w = m["warm_call"]
    series = [
        ("flame_asgi call (closure)", get(w, "ours", "closure")),
        ("flame_asgi call (function)", get(w, "ours", "function")),
        ("flame_asgi call (async function)", get(w, "ours", "async_function")),
        ("asyncio TCP echo (floor)", get(w, "floors", "tcp_echo")),
        ("WebSocket echo (floor)", get(w, "floors", "ws_echo")),
        ("httpx POST echo (floor)", get(w, "floors", "httpx_post_echo")),
        ("Ray task", w["peers"]["ray"]),
        ("Dask task", w["peers"]["dask"]),
    ]
    for label, data in series:
        samples = data.get("samples_us") if isinstance(data, dict) else None
        if not samples:
            continue
        n = len(samples)
        left.step(samples, [(i + 1) / n for i in range(n)], where="post",
                  label=f"{label}: p50 {data['p50_us']:,.0f} µs")
    left.set_xscale("log")
    left.set_xlabel("round trip (µs, log scale)")
    left.set_ylabel("fraction of calls")
    left.set_title("Warm round trip, best round (CDF)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8, loc="lower right")

    s = m["scale_out"]
    groups = [("flame_asgi", s["ours"]), ("Ray", s["peers"]["ray"]), ("Dask", s["peers"]["dask"])]
    groups = [(name, d) for name, d in groups if get(d, "runners_2", "best_ms")]
    width = 0.38
    for i, (_, d) in enumerate(groups):
        one, two = d["runners_1"]["best_ms"], d["runners_2"]["best_ms"]
        right.bar(i - width / 2, one, width, color="tab:gray", label="1 runner / worker" if i == 0 else None)
        right.bar(i + width / 2, two, width, color="tab:blue", label="2 runners / workers" if i == 0 else None)
        right.annotate(f"{one / two:.2f}x speed-up", (i, max(one, two)), ha="center", va="bottom", fontsize=9)
    right.set_xticks(range(len(groups)), [name for name, _ in groups])
    so = s["ours"]
    right.set_ylabel("wall time (ms)")
    right.set_title(f"Scale-out: {so.get('tasks', '?')} CPU-bound tasks of ~{so.get('task_ms', 0):g} ms")
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    _bookkeeping(sim_ax, m["pool_bookkeeping"]["ours"])
    meta = report["meta"]
    fig.suptitle(f"flame_asgi benchmark {meta['timestamp']} ({'--quick' if meta['quick'] else 'full'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bookkeeping(ax: Any, sim: P) -> None:
    """Per-decision time against the number of runners: flat or logarithmic, not linear."""
    per_size = sim.get("per_decision_us") if isinstance(sim, dict) else None
    if not per_size:
        ax.set_title("Pool bookkeeping: not measured in this run")
        return
    sizes = [int(n) for n in per_size]
    for op in per_size[str(sizes[0])]:
        ax.plot(sizes, [per_size[str(n)][op] for n in sizes], marker="o", label=op.replace("_", " "))
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("runners (log scale)")
    ax.set_ylabel("µs per decision")
    ax.set_title(f"Pool bookkeeping, {sim['waiters']:,} callers queued")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
