"""Assemble the measurements into the report (everything goes to the JSON).

Every measurement has ``ours`` (flame_asgi), ``peers`` (Ray, Dask: their figures or
``{"available": false, "reason": ...}``), ``floors``/``references`` where they apply, and
``ratios`` (> 1 means flame_asgi is better unless the name says otherwise). A family
whose run failed keeps its ``{"available": false, "reason": ...}`` as ``ours``; the
ratios and targets that need it become ``null``.
"""

from __future__ import annotations

from typing import Any

from bench._measure import ratio

P = dict[str, Any]
NO_PEER = {"available": False, "reason": "no equivalent measured"}


def get(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or ``None`` where any step is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _peer(peers: P, name: str, key: str) -> P:
    peer = peers.get(name, {})
    if not peer.get("available", False):
        return {"available": False, "reason": peer.get("reason", "not run")}
    return {"available": True, "version": peer.get("version"), **peer[key]}


def build(raw: P) -> P:
    """Turn the raw per-family results into measurements with peers and ratios."""
    return {"warm_call": _warm(raw), "throughput": _throughput(raw), "cold": _cold(raw),
            "scale_out": _scale(raw), "payload": _payload(raw),
            "burst": {"unit": "milliseconds", "ours": raw["burst"], "peers": {"ray": NO_PEER, "dask": NO_PEER},
                      "ratios": {}},
            "streams": {"unit": "MB/s; MB of parent peak RSS", "ours": raw["streams"],
                        "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": {}},
            "docker": {"unit": "milliseconds; MB/s", "ours": raw["docker"],
                       "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": get(raw["docker"], "ratios") or {}},
            "warm_runners": {"unit": "milliseconds", "ours": raw.get("warm", NO_PEER),
                             "peers": {"ray": NO_PEER, "dask": NO_PEER},
                             "ratios": get(raw.get("warm", {}), "ratios") or {}},
            "kubernetes": {"unit": "milliseconds; microseconds", "ours": raw.get("kubernetes", NO_PEER),
                           "peers": {"ray": NO_PEER, "dask": NO_PEER},
                           "ratios": get(raw.get("kubernetes", {}), "ratios") or {}},
            "pool_bookkeeping": {"unit": "microseconds per decision", "ours": raw["pool_sim"],
                                 "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": {}},
            "memory": {"unit": "kilobytes of parent RSS", "ours": raw["memory"],
                       "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": {}},
            "idle": {"unit": "% of a core; KB", "ours": raw.get("idle", NO_PEER),
                     "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": {}},
            "fanout": _fanout(raw)}


def _fanout(raw: P) -> P:
    ours = raw.get("fanout", NO_PEER)
    ray, dask = _peer(raw["peers"], "ray", "fanout"), _peer(raw["peers"], "dask", "fanout")
    return {"unit": "items per second; MB of the parent's peak Python allocations (tracemalloc)", "ours": ours,
            "peers": {"ray": ray, "dask": dask},
            "ratios": {"ours_over_ray": ratio(get(ours, "items_per_s"), ray.get("items_per_s")),
                       "ours_over_dask": ratio(get(ours, "items_per_s"), dask.get("items_per_s"))}}


def _warm(raw: P) -> P:
    lat, floors = raw["latency"], raw["floors"]
    ray, dask = _peer(raw["peers"], "ray", "latency"), _peer(raw["peers"], "dask", "latency")
    p50 = get(lat, "closure", "p50_us")
    return {
        "unit": "microseconds", "ours": lat, "floors": floors, "peers": {"ray": ray, "dask": dask},
        "ratios": {
            "ray_p50_over_ours": ratio(ray.get("p50_us"), p50),
            "dask_p50_over_ours": ratio(dask.get("p50_us"), p50),
            "ray_p99_over_ours": ratio(ray.get("p99_us"), get(lat, "closure", "p99_us")),
            "ours_over_ws_echo_floor": ratio(p50, get(floors, "ws_echo", "p50_us")),
            "ours_over_httpx_post_floor": ratio(p50, get(floors, "httpx_post_echo", "p50_us")),
        },
    }


def _throughput(raw: P) -> P:
    tput = raw["throughput"]
    ray, dask = _peer(raw["peers"], "ray", "throughput"), _peer(raw["peers"], "dask", "throughput")
    rates = {k: get(tput, k, "calls_per_s") for k in ("max_1", "max_2")}
    known = {k: v for k, v in rates.items() if v is not None}
    best = max(known, key=lambda k: known[k]) if known else None
    ours = {**tput, "best_pool": best} if known else tput
    best_rate = known.get(best) if best else None
    return {
        "unit": "calls per second", "ours": ours,
        "floors": {"ws_echo_pipelined": get(raw["floors"], "ws_echo", "pipelined")},
        "peers": {"ray": ray, "dask": dask},
        "ratios": {
            "ours_max_1_over_ray": ratio(rates["max_1"], ray.get("calls_per_s")),
            "ours_max_2_over_ray": ratio(rates["max_2"], ray.get("calls_per_s")),
            "ours_best_over_ray": ratio(best_rate, ray.get("calls_per_s")),
            "ours_best_over_dask": ratio(best_rate, dask.get("calls_per_s")),
        },
    }


def _cold(raw: P) -> P:
    cold, peers = raw["cold"], raw["peers"]
    starts = {name: ({"available": True, "start_to_first_result_ms": peers[name]["start_to_first_result_ms"]}
                     if get(peers, name, "available") else _peer(peers, name, "latency"))
              for name in ("ray", "dask")}
    empty = get(cold, "empty_pool", "best_ms")
    fresh = get(cold, "fresh_uvicorn_fastapi", "best_ms")
    if get(cold, "available") is False:
        ours: P = cold
        refs: P = {}
    else:
        ours = {"empty_pool": cold["empty_pool"], "scale_from_zero": cold["scale_from_zero"]}
        refs = {key: cold[key] for key in ("python_c_pass", "fresh_uvicorn_fastapi", "forked_uvicorn_fastapi")}
    return {
        "unit": "milliseconds", "ours": ours, "references": refs, "peers": starts,
        "ratios": {
            "scale_from_zero_over_fresh_fastapi": ratio(get(cold, "scale_from_zero", "best_ms"), fresh),
            "scale_from_zero_over_forked_fastapi": ratio(get(cold, "scale_from_zero", "best_ms"),
                                                         get(cold, "forked_uvicorn_fastapi", "best_ms")),
            "empty_pool_over_fresh_fastapi": ratio(empty, fresh),
            "ray_start_over_ours_empty_pool": ratio(get(starts, "ray", "start_to_first_result_ms"), empty),
            "dask_start_over_ours_empty_pool": ratio(get(starts, "dask", "start_to_first_result_ms"), empty),
        },
    }


def _scale(raw: P) -> P:
    so = raw["scaleout"]
    ray, dask = _peer(raw["peers"], "ray", "scaleout"), _peer(raw["peers"], "dask", "scaleout")
    return {
        "unit": "milliseconds (wall time of the task set)", "ours": so, "peers": {"ray": ray, "dask": dask},
        "ratios": {
            "ours_speedup": so.get("speedup"), "ray_speedup": ray.get("speedup"), "dask_speedup": dask.get("speedup"),
            "ray_2_over_ours_2": ratio(get(ray, "runners_2", "best_ms"), get(so, "runners_2", "best_ms")),
        },
    }


def _payload(raw: P) -> P:
    pay = raw["payload"]
    ray, dask = _peer(raw["peers"], "ray", "payload"), _peer(raw["peers"], "dask", "payload")
    sizes = [k for k in pay if k.endswith("MB")]
    return {
        "unit": "MB/s (payload size / round-trip time)", "ours": pay, "peers": {"ray": ray, "dask": dask},
        "ratios": {f"{size}_ours_over_ray": ratio(pay[size]["mb_per_s"], get(ray, size, "mb_per_s"))
                   for size in sizes},
    }


# The targets, each a figure from one run with its threshold. Ratios to a peer or a floor
# compare best-of-rounds figures measured in the same run.
TARGETS: list[tuple[str, str, str, float, bool]] = [
    # id, target, unit, threshold, lower is better
    ("warm_call_vs_floor", "warm closure call p50 at most 2x the WebSocket echo floor", "x", 2.0, True),
    ("warm_call_vs_ray", "warm closure call p50 at least 6x faster than Ray's", "x", 6.0, False),
    ("warm_call_tail", "warm closure call p99 at most 3x its p50", "x", 3.0, True),
    ("throughput_max_1_vs_ray", "throughput through one pool, max=1, at least 6x Ray's", "x", 6.0, False),
    ("throughput_max_2_vs_ray", "throughput through one pool, max=2, at least 6x Ray's", "x", 6.0, False),
    ("payload_1mb_vs_ray", "1 MB argument round trip at least as fast as Ray's (ProcessBackend)", "x", 1.0, False),
    ("payload_10mb_vs_ray", "10 MB argument round trip at least as fast as Ray's (ProcessBackend)", "x", 1.0,
     False),
    ("payload_100mb_vs_ray", "100 MB argument round trip at least 2x Ray's (ProcessBackend)", "x", 2.0, False),
    ("payload_100mb_docker", "100 MB argument round trip over DockerBackend's network at >= 300 MB/s", "MB/s",
     300.0, False),
    ("payload_100mb_kubernetes", "100 MB argument round trip to a KubernetesBackend runner Pod (real cluster) at "
     ">= 300 MB/s", "MB/s", 300.0, False),
    ("stream_upload", "Upload to a runner at >= 300 MB/s", "MB/s", 300.0, False),
    ("stream_download", "RemoteBytes back from a runner at >= 300 MB/s", "MB/s", 300.0, False),
    ("stream_memory", "streams keep the parent's memory bounded: peak RSS growth <= 64 MB", "MB", 64.0, True),
    ("scale_from_zero", "scale-from-zero call <= 15 ms to result (ProcessBackend)", "ms", 15.0, True),
    ("docker_cold_vs_docker_run", "DockerBackend cold call at most 1.5x `docker run` of the same image to its "
     "first response", "x", 1.5, True),
    ("pool_bookkeeping", "pool bookkeeping O(log n) per decision: 10,000 runners within 4x of 10", "x", 4.0, True),
    ("burst_none_lost", "1,000 concurrent calls through max=4, max_concurrency=10, none lost", "lost", 0, True),
    ("idle_parent", "150 idle runners cost the parent <= 1 % of a core", "% of a core", 1.0, True),
    ("idle_runners", "150 idle runners cost <= 5 % of a core together", "% of a core", 5.0, True),
    ("fanout_vs_ray", "pool.map of 100,000 trivial items over 100 runners at least as many items/s as Ray's "
     "ray.get([f.remote(x) ...])", "x", 1.0, False),
]


def targets(m: P) -> list[P]:
    """Each target met (True), not met (False) or not measured (None, with ``why``)."""
    w, t, p = m["warm_call"], m["throughput"], m["payload"]
    c, s, d, b = m["cold"], m["streams"]["ours"], m["docker"]["ours"], m["burst"]["ours"]
    sim = m["pool_bookkeeping"]["ours"]
    k8s = m.get("kubernetes", {}).get("ours", NO_PEER)
    idle = m.get("idle", {}).get("ours", NO_PEER)
    at_150 = next((pt for pt in get(idle, "points") or [] if pt.get("runners") == 150), {})
    ray_lat, ray_tput, ray_pay = w["peers"]["ray"], t["peers"]["ray"], p["peers"]["ray"]
    figures: dict[str, tuple[Any, str, list[Any]]] = {
        # id: (value, how it was measured, where a missing value's reason may be)
        "warm_call_vs_floor": (w["ratios"]["ours_over_ws_echo_floor"],
                               "ours p50 / bare WebSocket echo p50 to a uvicorn process",
                               [w["ours"], w["floors"]]),
        "warm_call_vs_ray": (w["ratios"]["ray_p50_over_ours"], "Ray p50 / ours p50", [w["ours"], ray_lat]),
        "warm_call_tail": (ratio(get(w, "ours", "closure", "p99_us"), get(w, "ours", "closure", "p50_us")),
                           "p99 / p50 of the best round", [w["ours"]]),
        "throughput_max_1_vs_ray": (t["ratios"]["ours_max_1_over_ray"], "ours calls/s / Ray tasks/s",
                                    [t["ours"], ray_tput]),
        "throughput_max_2_vs_ray": (t["ratios"]["ours_max_2_over_ray"], "ours calls/s / Ray tasks/s",
                                    [t["ours"], ray_tput]),
        "payload_1mb_vs_ray": (p["ratios"].get("1MB_ours_over_ray"), "ours MB/s / Ray MB/s", [p["ours"], ray_pay]),
        "payload_10mb_vs_ray": (p["ratios"].get("10MB_ours_over_ray"), "ours MB/s / Ray MB/s",
                                [p["ours"], ray_pay]),
        "payload_100mb_vs_ray": (p["ratios"].get("100MB_ours_over_ray"), "ours MB/s / Ray MB/s",
                                 [p["ours"], ray_pay]),
        "payload_100mb_docker": (get(d, "payload_100MB", "mb_per_s"), "size / round trip, best round", [d]),
        "payload_100mb_kubernetes": (get(k8s, "payload_100MB", "mb_per_s"), "size / round trip, best round, "
                                     "one runner Pod on the single-node cluster", [k8s]),
        "stream_upload": (get(s, "upload", "mb_per_s"), f"{get(s, 'size_mb')} MB file, best round", [s]),
        "stream_download": (get(s, "download", "mb_per_s"), f"{get(s, 'size_mb')} MB, best round", [s]),
        "stream_memory": (get(s, "parent_peak_growth_mb"),
                          f"parent VmHWM growth over {get(s, 'size_mb')} MB each way", [s]),
        "scale_from_zero": (get(c, "ours", "scale_from_zero", "best_ms"), "runner idled away, best round",
                            [c["ours"]]),
        "docker_cold_vs_docker_run": (get(d, "ratios", "cold_call_over_docker_run"),
                                      f"cold call {get(d, 'cold_call', 'best_ms')} ms / `docker run` to first "
                                      f"response {get(d, 'docker_run_first_response', 'best_ms')} ms", [d]),
        "pool_bookkeeping": (get(sim, "worst_ratio"),
                             "the decision that grows most: its time at 10,000 runners / at 10, "
                             f"{get(sim, 'waiters') or 0:,} callers queued", [sim]),
        "burst_none_lost": (b.get("lost"), f"{b.get('calls')} calls, {len(b.get('rounds_ms', []))} round(s)", [b]),
        "idle_parent": (at_150.get("parent_cpu_pct"), f"parent CPU time over {get(idle, 'window_s')} s, nothing "
                        "running", [idle]),
        "idle_runners": (at_150.get("runners_cpu_pct"), f"the runners' CPU time over {get(idle, 'window_s')} s",
                         [idle]),
        "fanout_vs_ray": (get(m, "fanout", "ratios", "ours_over_ray"),
                          f"ours items/s / Ray's, {get(m, 'fanout', 'ours', 'items') or 0:,} items, best round",
                          [get(m, "fanout", "ours"), get(m, "fanout", "peers", "ray")]),
    }
    out = []
    for id_, text, unit, threshold, lower in TARGETS:
        value, how, sources = figures[id_]
        out.append(_target(id_, text, value, threshold, unit, how, lower, _why(sources)))
    return out


def _why(sources: list[Any]) -> str:
    """Why a figure is missing: the first unavailable source's reason."""
    for source in sources:
        if isinstance(source, dict) and source.get("available") is False:
            return str(source.get("reason") or "unavailable")
    return "a figure it needs is missing from this run"


def _target(id_: str, text: str, value: float | None, threshold: float, unit: str, how: str,
            lower_is_better: bool, why: str) -> P:
    met = None if value is None else (value <= threshold if lower_is_better else value >= threshold)
    return {"id": id_, "target": text, "value": value, "threshold": threshold, "unit": unit,
            "lower_is_better": lower_is_better, "met": met, "how": how, "why": None if met is not None else why}
