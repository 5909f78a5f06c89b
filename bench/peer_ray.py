"""``python -m bench.peer_ray``: Ray's side (``ray.init(num_cpus=2)``, ``ray.get(f.remote())``)."""

from __future__ import annotations

from typing import Any

from bench import tasks
from bench._peer_common import main


class RayPeer:
    name = "ray"

    def start(self) -> dict[str, Any]:
        import ray

        self.ray = ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.nothing = ray.remote(tasks.nothing)
        self.echo_task = ray.remote(tasks.echo)
        self.identity = ray.remote(tasks.identity)
        self.spin_one = ray.remote(num_cpus=1)(tasks.spin)
        self.spin_alone = ray.remote(num_cpus=2)(tasks.spin)  # takes both CPUs: one at a time
        return {"version": ray.__version__, "setup": "ray.init(num_cpus=2, include_dashboard=False)"}

    def one(self) -> object:
        return self.ray.get(self.nothing.remote())

    def batch(self, n: int) -> object:
        return self.ray.get([self.nothing.remote() for _ in range(n)])

    def spin_set(self, count: int, iterations: int, workers: int) -> object:
        task = self.spin_one if workers == 2 else self.spin_alone
        return self.ray.get([task.remote(iterations) for _ in range(count)])

    def echo(self, data: bytes) -> bytes:
        result: bytes = self.ray.get(self.echo_task.remote(data))
        return result

    def fanout(self, n: int) -> list[object]:
        return list(self.ray.get([self.identity.remote(x) for x in range(n)]))

    def stop(self) -> None:
        self.ray.shutdown()


if __name__ == "__main__":
    main(RayPeer)
