"""The peers, each in its own interpreter: Ray tasks and Dask distributed futures.

A peer that cannot be imported, started or finished in time is recorded as unavailable,
with the reason; the rest of the run goes on.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from bench._config import Config
from bench._measure import now, unavailable
from bench._subproc import run_json

PEERS = {"ray": ("ray", "bench.peer_ray"), "dask": ("distributed", "bench.peer_dask")}
INSTALL = 'pip install ray "dask[distributed]"'


async def measure(cfg: Config, spin_iterations: int, deadline: float | None = None) -> dict[str, Any]:
    """Each peer gets ``peer_timeout``, or its share of the time left before ``deadline``."""
    out: dict[str, Any] = {}
    for i, (name, (package, module)) in enumerate(PEERS.items()):
        if importlib.util.find_spec(package) is None:
            out[name] = unavailable(f"{package} is not installed ({INSTALL})")
            continue
        timeout = cfg.peer_timeout
        if deadline is not None:
            # At least a minute: Ray alone takes ~6 s to start, and a peer cut short measures nothing.
            timeout = max(60.0, min(timeout, (deadline - now()) / (len(PEERS) - i)))
        args = ["--spin", str(spin_iterations), *(["--quick"] if cfg.quick else [])]
        out[name] = await run_json(module, args, timeout)
    return out
