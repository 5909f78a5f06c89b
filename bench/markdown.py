"""The report as Markdown: one table of figures beside the peers and floors, one of targets
(each met, not met, or not measured with the reason), and the bookkeeping simulation's."""

from __future__ import annotations

from typing import Any

from bench.report import get

P = dict[str, Any]
Row = tuple[str, ...]


def cell(d: Any, *path: str, unit: str = "", digits: int = 0) -> str:
    """A figure from ``d`` at ``path``, "unavailable" if ``d`` says so, "n/a" if missing."""
    if isinstance(d, dict) and d.get("available") is False:
        return "unavailable"
    value = get(d, *path)
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f} {unit}".strip()
    return "n/a" if value is None else str(value)


def times(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "n/a"


def reason(d: Any, key: str = "reason") -> str:
    text = str(get(d, key) or "").replace("|", "/").replace("\n", " ")
    return text if len(text) < 160 else text[:157] + "..."


def figure(goal: P) -> str:
    """A target's measured figure with its unit, or "not measured"."""
    value = goal["value"]
    if value is None:
        return "not measured"
    digits = 2 if goal["unit"] == "x" else (0 if isinstance(value, int) or value >= 100 else 1)
    return cell(goal, "value", unit=goal["unit"], digits=digits)


def verdict(goal: P) -> str:
    """``measured (threshold) met / not met``, or ``not measured (why)``."""
    bound = ("<=" if goal["lower_is_better"] else ">=") + f" {goal['threshold']:g} {goal['unit']}"
    if goal["met"] is None:
        return f"not measured ({goal['why']}); threshold {bound}"
    return f"{figure(goal)} (threshold {bound}): {'met' if goal['met'] else 'not met'}"


def render(report: P) -> str:
    m, meta = report["measurements"], report["meta"]
    rows = [*_warm(m["warm_call"]), *_throughput(m["throughput"]), *_cold(m["cold"]), *_scale(m["scale_out"]),
            *_payload(m["payload"]), *_docker(m["docker"]["ours"]),
            *_warm_runners(m.get("warm_runners", {}).get("ours", {"available": False})),
            *_idle(m.get("idle", {}).get("ours", {"available": False})), *_fanout(m.get("fanout", {})),
            *_kubernetes(m.get("kubernetes", {}).get("ours", {"available": False})), *_streams(m["streams"]["ours"]),
            *_burst_memory(m["burst"]["ours"], m["memory"]["ours"])]
    peers = m["warm_call"]["peers"]
    lines = [
        f"Run {meta['timestamp']} ({'--quick' if meta['quick'] else 'full'}), {meta['cpus']} CPUs, "
        f"Python {meta['python']}, flame_asgi {meta['flame_asgi']} ({meta['git']}), "
        f"Ray {cell(peers['ray'], 'version')}, Dask {cell(peers['dask'], 'version')}; "
        f"load average {meta['loadavg_before'][0]:.1f} before, {meta['loadavg_after'][0]:.1f} after.",
        "",
        "| measurement | flame_asgi | Ray | Dask | floor / reference | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| target | measured | threshold | met |",
        "| --- | --- | --- | --- |",
        *(f"| {g['target']} | {figure(g)} ({g['how'] if g['met'] is not None else reason(g, 'why')}) | "
          f"{'≤' if g['lower_is_better'] else '≥'} {g['threshold']:g} {g['unit']} | "
          f"{'not measured' if g['met'] is None else ('met' if g['met'] else 'not met')} |"
          for g in report["targets"]),
        "",
        *_bookkeeping(m["pool_bookkeeping"]["ours"]),
    ]
    unavailable = [(name, d) for name, d in _parts(m) if isinstance(d, dict) and d.get("available") is False]
    if unavailable:
        lines += ["", *(f"- {name} unavailable: {reason(d)}" for name, d in unavailable)]
    return "\n".join(lines) + "\n"


def _parts(m: P) -> list[tuple[str, Any]]:
    parts: list[tuple[str, Any]] = []
    for family, data in m.items():
        parts.append((family, data["ours"]))
        if family in ("warm_call",):
            parts += [(f"{family}: {peer}", d) for peer, d in data["peers"].items()]
    return parts


def _warm(w: P) -> list[Row]:
    ours, fl, ray, dask, r = w["ours"], w["floors"], w["peers"]["ray"], w["peers"]["dask"], w["ratios"]
    floors = (f"WS echo {cell(fl, 'ws_echo', 'p50_us', unit='µs')}; "
              f"httpx POST {cell(fl, 'httpx_post_echo', 'p50_us', unit='µs')}; "
              f"TCP {cell(fl, 'tcp_echo', 'p50_us', unit='µs')}")
    return [
        ("warm call p50 (trivial closure)", cell(ours, "closure", "p50_us", unit="µs"), cell(ray, "p50_us", unit="µs"),
         cell(dask, "p50_us", unit="µs"), floors, f"Ray/ours {times(r['ray_p50_over_ours'])}"),
        ("warm call p99 (trivial closure)", cell(ours, "closure", "p99_us", unit="µs"), cell(ray, "p99_us", unit="µs"),
         cell(dask, "p99_us", unit="µs"), f"WS echo {cell(fl, 'ws_echo', 'p99_us', unit='µs')}",
         f"Ray/ours {times(r['ray_p99_over_ours'])}"),
        ("warm call p50 (module-level function)", cell(ours, "function", "p50_us", unit="µs"), "", "", "", ""),
        ("warm call p50 (module-level async function)", cell(ours, "async_function", "p50_us", unit="µs"), "", "", "",
         ""),
    ]


def _throughput(t: P) -> list[Row]:
    rows: list[Row] = []
    for key in ("max_1", "max_2"):
        floor = f"WS echo pipelined {cell(t['floors'], 'ws_echo_pipelined', 'msgs_per_s', unit='msgs/s')}"
        rows.append((f"throughput, one pool {key.replace('_', '=')}",
                     cell(t["ours"], key, "calls_per_s", unit="calls/s"),
                     cell(t["peers"]["ray"], "calls_per_s", unit="tasks/s"),
                     cell(t["peers"]["dask"], "calls_per_s", unit="tasks/s"), floor if key == "max_1" else "",
                     f"ours/Ray {times(t['ratios'][f'ours_{key}_over_ray'])}"))
    return rows


def _cold(c: P) -> list[Row]:
    refs, r = c["references"], c["ratios"]
    return [
        ("cold: empty pool (min=0) to first result", cell(c["ours"], "empty_pool", "best_ms", unit="ms"),
         cell(c["peers"]["ray"], "start_to_first_result_ms", unit="ms (init)"),
         cell(c["peers"]["dask"], "start_to_first_result_ms", unit="ms (cluster)"),
         f"`python -c pass` {cell(refs, 'python_c_pass', 'best_ms', unit='ms')}; fresh uvicorn+FastAPI "
         f"{cell(refs, 'fresh_uvicorn_fastapi', 'best_ms', unit='ms')}",
         f"ours/fresh FastAPI {times(r['empty_pool_over_fresh_fastapi'])}"),
        ("cold: scale-from-zero call", cell(c["ours"], "scale_from_zero", "best_ms", unit="ms"), "", "",
         "FastAPI app forked from a pre-imported template "
         f"{cell(refs, 'forked_uvicorn_fastapi', 'best_ms', unit='ms')}",
         f"ours/fresh FastAPI {times(r['scale_from_zero_over_fresh_fastapi'])}; "
         f"ours/forked {times(r['scale_from_zero_over_forked_fastapi'])}"),
    ]


def _scale(s: P) -> list[Row]:
    so, ray, dask = s["ours"], s["peers"]["ray"], s["peers"]["dask"]
    label = f"{so.get('tasks', '?')} x {so.get('task_ms', 0):g} ms CPU tasks"
    rows: list[Row] = [
        (f"scale-out: {label}, {n} runner{'s' if n > 1 else ''}", cell(so, f"runners_{n}", "best_ms", unit="ms"),
         cell(ray, f"runners_{n}", "best_ms", unit="ms"), cell(dask, f"runners_{n}", "best_ms", unit="ms"), "", "")
        for n in (1, 2)]
    rows.append(("scale-out speed-up (1 → 2)", times(so.get("speedup")), times(ray.get("speedup")),
                 times(dask.get("speedup")), "", ""))
    return rows


def _payload(p: P) -> list[Row]:
    if p["ours"].get("available") is False:
        return [("payload round trips", "unavailable", "", "", "", "")]
    return [(f"payload round trip {size}", cell(p["ours"], size, "mb_per_s", unit="MB/s"),
             cell(p["peers"]["ray"], size, "mb_per_s", unit="MB/s"),
             cell(p["peers"]["dask"], size, "mb_per_s", unit="MB/s"), "",
             f"ours/Ray {times(p['ratios'].get(f'{size}_ours_over_ray'))}") for size in p["ours"]]


def _docker(d: P) -> list[Row]:
    if d.get("available") is False:
        return [("DockerBackend: cold call, 100 MB round trip", "unavailable", "", "", "", "")]
    return [
        ("DockerBackend: cold call (pool min=0) to result", cell(d, "cold_call", "best_ms", unit="ms"), "", "",
         "`docker run` of the same image to first response "
         f"{cell(d, 'docker_run_first_response', 'best_ms', unit='ms')}",
         f"ours/docker run {times(get(d, 'ratios', 'cold_call_over_docker_run'))}"),
        ("DockerBackend: payload round trip 100MB", cell(d, "payload_100MB", "mb_per_s", unit="MB/s"), "", "", "",
         ""),
    ]


def _warm_runners(w: P) -> list[Row]:
    if w.get("available") is False:
        return [("warm runners (warm=)", "unavailable", "", "", "", "")]
    rows = []
    for key, name in (("process_busy_call", "ProcessBackend"), ("docker_busy_call", "DockerBackend")):
        d = w.get(key, {})
        if d.get("available") is False:
            rows.append((f"{name}: a call finding its pool busy, warm=1", "unavailable", "", "", "", ""))
            continue
        rows.append((f"{name}: a call finding its pool busy, warm=1 (a spare up)",
                     cell(d, "warm", "best_ms", unit="ms"), "", "",
                     f"warm=0 (it waits for a boot) {cell(d, 'cold', 'best_ms', unit='ms')}",
                     f"cold/warm {times(_ratio_of(d))}"))
        if "standby" in d:
            rows.append((f"{name}: the same call, warm=0 with standby=1 (the boot starts a created container)",
                         cell(d, "standby", "best_ms", unit="ms"), "", "", "",
                         f"cold/standby {times(get(w, 'ratios', 'docker_cold_over_standby'))}"))
    b = w.get("burst", {})
    for label in ("warm", "cold"):
        r = b.get(label, {})
        rows.append((f"burst of {cell(r, 'calls')} x 10 ms against an idle pool, max=10, warm={cell(r, 'warm')}: "
                     "first result; p50; p99", f"{cell(r, 'first_result_ms', unit='ms')}; "
                     f"{cell(r, 'p50_ms', unit='ms')}; {cell(r, 'p99_ms', unit='ms')}", "", "",
                     f"{cell(r, 'runners_up_before')} runner(s) up before it", ""))
    return rows


def _idle(d: P) -> list[Row]:
    if d.get("available") is False:
        return [("idle runners: CPU and memory", "unavailable", "", "", "", "")]
    rows = [(f"{p['runners']} idle runners: parent CPU; runners' CPU", f"{p['parent_cpu_pct']} %; "
             f"{p['runners_cpu_pct']} % of a core", "", "",
             f"{p['wakeups_per_runner_per_s']} wake-ups/s per runner; parent {p['parent_wakeups_per_s']}/s; "
             f"fork server {p.get('fork_server_cpu_pct', 'n/a')} %, {p.get('fork_server_wakeups_per_s', 'n/a')}/s",
             f"{p['runner_pss_kb']} KB PSS per runner, {p['parent_rss_per_runner_kb']} KB parent RSS per runner")
            for p in d.get("points", [])]
    fit = d.get("fit", {})
    rows.append(("idle runners at 10,000 (estimate)",
                 f"parent {get(fit, 'parent_cpu_pct', 'at_10000')} %, runners "
                 f"{get(fit, 'runners_cpu_pct', 'at_10000')} % of a core; {get(fit, 'memory', 'at_10000_gb')} GB",
                 "", "",
                 f"{get(fit, 'parent_cpu_pct', 'formula')}; {get(fit, 'runners_cpu_pct', 'formula')}",
                 f"{get(fit, 'memory', 'formula')}"))
    return rows


def _fanout(f: P) -> list[Row]:
    ours: P = f.get("ours", {"available": False})
    if ours.get("available") is False:
        return [("fan-out: pool.map of trivial items over 100 runners", "unavailable", "", "", "", "")]
    ray, dask = f["peers"]["ray"], f["peers"]["dask"]
    return [(f"fan-out: pool.map of {ours['items']:,} trivial items over {ours['runners']} runners",
             cell(ours, "items_per_s", unit="items/s", digits=0), cell(ray, "items_per_s", unit="items/s", digits=0),
             cell(dask, "items_per_s", unit="items/s", digits=0),
             f"parent peak {cell(ours, 'parent_peak_mb')} MB of Python allocations "
             f"({cell(ours, 'half', 'parent_peak_mb')} MB at {cell(ours, 'half', 'items')} items); "
             f"{cell(ours, 'max_in_flight')} in flight at most",
             f"ours/Ray {times(get(f, 'ratios', 'ours_over_ray'))}")]


def _ratio_of(d: P) -> float | None:
    cold, warm = get(d, "cold", "best_ms"), get(d, "warm", "best_ms")
    return round(cold / warm, 1) if cold and warm else None


def _kubernetes(k: P) -> list[Row]:
    if k.get("available") is False:
        return [("KubernetesBackend (real cluster): cold and warm call", "unavailable", "", "", "", "")]
    return [
        ("KubernetesBackend (real cluster): cold call (pool min=0) to result",
         cell(k, "cold_call", "best_ms", unit="ms"),
         "", "", f"the same Pod from create to Ready {cell(k, 'pod_create_to_ready', 'best_ms', unit='ms')}",
         f"ours/Pod Ready {times(get(k, 'ratios', 'cold_call_over_pod_ready'))}"),
        ("KubernetesBackend (real cluster): warm call p50", cell(k, "warm_call", "p50_us", unit="us"), "", "",
         f"p99 {cell(k, 'warm_call', 'p99_us', unit='us')}", ""),
        ("KubernetesBackend (real cluster): payload round trip 100MB", cell(k, "payload_100MB", "mb_per_s",
                                                                             unit="MB/s"), "", "", "", ""),
    ]


def _streams(s: P) -> list[Row]:
    if s.get("available") is False:
        return [("streams: Upload and RemoteBytes", "unavailable", "", "", "", "")]
    size = cell(s, "size_mb", unit="MB")
    return [
        (f"stream: Upload of {size} to a runner", cell(s, "upload", "mb_per_s", unit="MB/s"), "", "", "", ""),
        (f"stream: RemoteBytes of {size} back", cell(s, "download", "mb_per_s", unit="MB/s"), "", "", "", ""),
        (f"stream: parent peak RSS growth over {size} each way", cell(s, "parent_peak_growth_mb", unit="MB", digits=1),
         "", "", "", ""),
    ]


def _bookkeeping(sim: P) -> list[str]:
    """Per-decision time of ``PoolState`` at each simulated size."""
    if sim.get("available") is False:
        return [f"Pool bookkeeping simulation unavailable: {reason(sim)}"]
    sizes = list(sim["per_decision_us"])
    ops = list(sim["per_decision_us"][sizes[0]])
    return [
        f"Pool bookkeeping (`PoolState` alone, {sim['waiters']:,} callers queued, µs per decision, best of "
        f"{sim['rounds']} rounds of {sim['ops_per_round']:,}):",
        "",
        "| decision | " + " | ".join(f"{int(n):,} runners" for n in sizes)
        + f" | {int(sizes[-1]):,} / {int(sizes[0]):,} |",
        "| --- | " + " | ".join("---" for _ in sizes) + " | --- |",
        *(f"| {op.replace('_', ' ')} | " + " | ".join(f"{sim['per_decision_us'][n][op]:.2f}" for n in sizes)
          + f" | {times(sim['ratio_largest_over_smallest'][op])} |" for op in ops),
    ]


def _burst_memory(b: P, mem: P) -> list[Row]:
    burst = (f"{cell(b, 'best_ms', unit='ms')}, {cell(b, 'lost')} lost" if b.get("available") is not False
             else "unavailable")
    return [
        (f"burst: {cell(b, 'calls')} calls, max={cell(b, 'max')}, max_concurrency={cell(b, 'max_concurrency')} "
         "(from an empty pool)", burst, "", "", "", ""),
        ("parent RSS per runner", cell(mem, "per_runner_kb", unit="KB"), "", "", "", ""),
        ("parent RSS per 1,000 queued calls", cell(mem, "per_1000_queued_kb", unit="KB"), "", "",
         f"Python heap {cell(mem, 'per_1000_queued_heap_kb', unit='KB')}", ""),
    ]
