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
            "memory": {"unit": "kilobytes of parent RSS", "ours": raw["memory"],
                       "peers": {"ray": NO_PEER, "dask": NO_PEER}, "ratios": {}}}


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


def targets(m: P) -> list[P]:
    """The performance targets (docs/performance.md), each met (True), not met (False) or unknown (None)."""
    pool = get(m, "throughput", "ours", "best_pool")
    burst = m["burst"]["ours"]
    return [
        _target("warm_call_vs_ray", "warm call p50 at least 4x faster than Ray's",
                m["warm_call"]["ratios"]["ray_p50_over_ours"], 4.0, "x",
                "Ray p50 / ours p50, best of 3 rounds each (trivial closure)"),
        _target("throughput_vs_ray", "trivial-call throughput through one pool at least 5x Ray's",
                m["throughput"]["ratios"]["ours_best_over_ray"], 5.0, "x",
                f"ours ({(pool or 'n/a').replace('_', '=')}) / Ray, best of 3 rounds each"),
        _target("scale_from_zero", "scale-from-zero call <= 150 ms to result",
                get(m, "cold", "ours", "scale_from_zero", "best_ms"), 150.0, "ms",
                "best of 3; ProcessBackend, runner idled away", lower_is_better=True),
        _target("payload_100mb", "100 MB argument round trip at >= 300 MB/s",
                get(m, "payload", "ours", "100MB", "mb_per_s"), 300.0, "MB/s", "best of the rounds"),
        _target("burst_none_lost", "1,000 concurrent calls through max=4, max_concurrency=10, none lost",
                burst.get("lost"), 0, "lost", f"{burst.get('calls')} calls, {len(burst.get('rounds_ms', []))} round(s)",
                lower_is_better=True),
    ]


def _target(id_: str, text: str, value: float | None, threshold: float, unit: str, how: str,
            lower_is_better: bool = False) -> P:
    met = None if value is None else (value <= threshold if lower_is_better else value >= threshold)
    return {"id": id_, "target": text, "value": value, "threshold": threshold, "unit": unit, "met": met,
            "how": how}
