"""``python -m bench.peer_dask``: Dask distributed's side (LocalCluster, 2 worker processes)."""

from __future__ import annotations

import warnings
from typing import Any

from bench import tasks
from bench._peer_common import main


class DaskPeer:
    name = "dask"
    # One fan-out round, not best of 3: its scheduler takes minutes per 100,000 tasks here,
    # and Dask is a reference, not a target (three rounds ran past peer_timeout).
    fanout_rounds = 1

    def start(self) -> dict[str, Any]:
        import dask
        from dask.distributed import Client, LocalCluster

        warnings.filterwarnings("ignore")  # "large object in task graph" for the payload runs
        self.cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client = Client(self.cluster)  # type: ignore[no-untyped-call]
        self.workers = list(self.client.scheduler_info()["workers"])
        return {"version": getattr(dask, "__version__", "?"),
                "setup": "LocalCluster(n_workers=2, threads_per_worker=1, processes=True)"}

    def one(self) -> object:
        return self.client.submit(tasks.nothing, pure=False).result()

    def batch(self, n: int) -> object:
        futures = [self.client.submit(tasks.nothing, pure=False) for _ in range(n)]
        return self.client.gather(futures)  # type: ignore[no-untyped-call]

    def spin_set(self, count: int, iterations: int, workers: int) -> object:
        chosen = self.workers[:1] if workers == 1 else None  # one worker: every task pinned to the first
        futures = [self.client.submit(tasks.spin, iterations, pure=False, workers=chosen) for _ in range(count)]
        return self.client.gather(futures)  # type: ignore[no-untyped-call]

    def echo(self, data: bytes) -> bytes:
        result: bytes = self.client.submit(tasks.echo, data, pure=False).result()
        return result

    def fanout(self, n: int) -> list[object]:
        futures = self.client.map(tasks.identity, range(n), pure=False)
        return list(self.client.gather(futures))  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
        self.cluster.close()


if __name__ == "__main__":
    main(DaskPeer)
