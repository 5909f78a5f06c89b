"""How much work each benchmark does: ``--quick`` (about five minutes with the peers) or the full run."""

from __future__ import annotations

import dataclasses

MB = 1_000_000  # payload sizes and MB/s use decimal megabytes


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int = 3  # best of 3 on every side of a ratio target
    latency_calls: int = 2000  # timed sequential calls per round
    latency_warmup: int = 200
    latency_budget_s: float = 10.0  # a round stops early past this (slow peers)
    throughput_calls: int = 10_000  # calls per round
    throughput_batch: int = 200  # concurrent callers per asyncio.gather batch
    throughput_budget_s: float = 15.0  # a round stops after the batch that passes this
    cold_rounds: int = 3
    spin_tasks: int = 16
    scaleout_rounds: int = 3
    spin_ms: float = 50.0
    payload_sizes_mb: tuple[int, ...] = (1, 10, 100)
    payload_rounds: tuple[int, ...] = (20, 10, 3)
    peer_payload_rounds: tuple[int, ...] = (20, 10, 3)
    burst_calls: int = 1000
    burst_rounds: int = 3
    memory_runners: int = 4
    memory_queued: int = 1000
    stream_mb: int = 200  # Upload / RemoteBytes size, each way
    stream_rounds: int = 3
    pool_sim_waiters: int = 1_000_000  # callers queued in the bookkeeping simulation
    pool_sim_ops: int = 20_000  # timed decisions of each kind, per round and size
    fanout_items: int = 100_000  # pool.map items per round, and the peers' task count
    fanout_runners: int = 100
    fanout_rounds: int = 3
    peer_timeout: float = 600.0  # seconds for one peer's whole subprocess
    total_budget_s: float | None = None  # peers share what is left of it (``--quick``)

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            latency_calls=300,
            latency_warmup=50,
            latency_budget_s=1.0,
            throughput_calls=1000,
            throughput_budget_s=1.5,
            payload_rounds=(5, 3, 2),  # 100 MB stays: it is a target
            peer_payload_rounds=(3, 2, 1),
            scaleout_rounds=2,
            burst_rounds=1,
            stream_mb=100,
            stream_rounds=2,
            pool_sim_waiters=100_000,
            pool_sim_ops=5_000,
            fanout_items=20_000,
            fanout_rounds=1,
            peer_timeout=90.0,
            total_budget_s=330.0,
        )

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
