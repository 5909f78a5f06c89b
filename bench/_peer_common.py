"""The peers' side of each comparison, written once against a small adapter.

``peer_ray`` and ``peer_dask`` each provide a ``Peer`` (how to do one round trip, a batch,
a CPU-bound task set, an echo) and call ``main``; this module runs the same measurements
the pool gets, with the same counts, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Protocol

from bench._config import MB, Config
from bench._measure import MIN_SAMPLES, best_latency, best_rate, best_time, latency_summary, now
from bench._subproc import write_json


class Peer(Protocol):
    name: str

    def start(self) -> dict[str, Any]: ...  # boots the cluster; returns versions etc.

    def one(self) -> object: ...  # one trivial task, waited for

    def batch(self, n: int) -> object: ...  # n trivial tasks at once, all waited for

    def spin_set(self, tasks: int, iterations: int, workers: int) -> object: ...

    def echo(self, data: bytes) -> bytes: ...

    def fanout(self, n: int) -> list[object]: ...  # identity(x) for x in range(n), results in order

    def stop(self) -> None: ...


def main(make_peer: Callable[[], Peer]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--spin", type=int, required=True, help="spin() iterations of one CPU-bound task")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_json(args.out, measure(make_peer(), Config.make(args.quick), args.spin))


def measure(peer: Peer, cfg: Config, spin: int) -> dict[str, Any]:
    start = now()
    info = peer.start()
    peer.one()
    cold_ms = (now() - start) * 1000
    try:
        result = {"available": True, **info, "start_to_first_result_ms": round(cold_ms, 1),
                  "latency": _latency(peer, cfg), "throughput": _throughput(peer, cfg),
                  "scaleout": _scaleout(peer, cfg, spin), "payload": _payload(peer, cfg), "fanout": _fanout(peer, cfg)}
        return {**result, "duration_s": round(now() - start, 1)}
    finally:
        peer.stop()


def _latency(peer: Peer, cfg: Config) -> dict[str, Any]:
    rounds = []
    for i in range(cfg.rounds):
        for _ in range(cfg.latency_warmup if i == 0 else cfg.latency_warmup // 4):
            peer.one()
        samples: list[float] = []
        deadline = now() + cfg.latency_budget_s
        for _ in range(cfg.latency_calls):
            t = now()
            peer.one()
            samples.append(now() - t)
            if t > deadline and len(samples) >= MIN_SAMPLES:
                break
        rounds.append(latency_summary(samples))
    return best_latency(rounds)


def _throughput(peer: Peer, cfg: Config) -> dict[str, Any]:
    peer.batch(cfg.throughput_batch)  # warm up
    rates = []
    for _ in range(cfg.rounds):
        t = now()
        done = 0
        while done < cfg.throughput_calls and now() < t + cfg.throughput_budget_s:
            n = min(cfg.throughput_batch, cfg.throughput_calls - done)
            peer.batch(n)
            done += n
        rates.append(done / (now() - t))
    return best_rate(rates, "calls_per_s")


def _scaleout(peer: Peer, cfg: Config, spin: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workers in (1, 2):
        peer.spin_set(4, 1000, workers)  # warm up
        samples = []
        for _ in range(cfg.scaleout_rounds):
            t = now()
            peer.spin_set(cfg.spin_tasks, spin, workers)
            samples.append(now() - t)
        out[f"runners_{workers}"] = best_time(samples)
    out["speedup"] = round(out["runners_1"]["best_ms"] / out["runners_2"]["best_ms"], 2)
    return out


def _payload(peer: Peer, cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size_mb, rounds in zip(cfg.payload_sizes_mb, cfg.peer_payload_rounds, strict=True):
        data = os.urandom(size_mb * MB)
        rates = []
        for _ in range(rounds):
            t = now()
            back = peer.echo(data)
            elapsed = now() - t
            if len(back) != len(data):
                raise AssertionError(f"{peer.name}: {size_mb} MB echo came back different")
            rates.append(size_mb / elapsed)
            del back
        out[f"{size_mb}MB"] = {**best_rate(rates, "mb_per_s"),
                               "best_round_trip_ms": round(size_mb / max(rates) * 1000, 1)}
    return out


def _fanout(peer: Peer, cfg: Config) -> dict[str, Any]:
    peer.fanout(1000)  # warm up
    rates = []
    for _ in range(getattr(peer, "fanout_rounds", cfg.fanout_rounds)):
        t = now()
        results = peer.fanout(cfg.fanout_items)
        rates.append(cfg.fanout_items / (now() - t))
        if results != list(range(cfg.fanout_items)):
            raise AssertionError(f"{peer.name}: fan-out results came back different")
    return {"items": cfg.fanout_items, **best_rate(rates, "items_per_s")}
