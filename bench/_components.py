"""Clean per-operation costs of one trivial call (no profiler attached): the pieces a
warm call is made of, timed alone in this process. Used by ``bench.profile``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cloudpickle  # type: ignore[import-untyped]

from bench import tasks
from bench._measure import now
from flame_asgi._runner.threads import ElasticThreadPool
from flame_asgi._wire.codec import TO_RUNNER, FrameOpener, FrameSealer, make_signer

N = 5000


def _per_call_us(fn: Callable[[], object], n: int = N) -> float:
    fn()
    start = now()
    for _ in range(n):
        fn()
    return round((now() - start) / n * 1e6, 1)


async def measure() -> dict[str, float]:
    closure = tasks.make_closure(1)
    payload = cloudpickle.dumps((closure, ()), protocol=pickle.HIGHEST_PROTOCOL)
    secret = os.urandom(32)
    sealer = FrameSealer(make_signer(secret, "r", TO_RUNNER), "s", 1 << 29)
    out = {
        "cloudpickle_dumps_closure_us": _per_call_us(lambda: cloudpickle.dumps((closure, ()), protocol=5)),
        "cloudpickle_dumps_function_us": _per_call_us(lambda: cloudpickle.dumps((tasks.nothing, ()), protocol=5)),
        "pickle_loads_closure_us": _per_call_us(lambda: pickle.loads(payload)),
        "seal_frame_us": _per_call_us(lambda: sealer.seal("call", 1, payload, k="call", l=True, p=False, w=32)),
    }
    sender = FrameSealer(make_signer(secret, "r", TO_RUNNER), "s", 1 << 29)
    frames = iter([sender.seal("call", 1, payload, k="call", l=True, p=False, w=32) for _ in range(N + 1)])
    opener = FrameOpener(make_signer(secret, "r", TO_RUNNER), 1 << 29, "s")
    out["open_frame_us"] = _per_call_us(lambda: opener.open(next(frames)))
    out["frame_bytes"] = len(sender.seal("call", 1, payload, k="call", l=True, p=False, w=32))
    big = os.urandom(16 * 1024 * 1024)  # per-MB costs of what a large payload goes through
    out["sha256_hexdigest_us_per_mb"] = round(_per_call_us(lambda: hashlib.sha256(big).hexdigest(), 5) / 16, 1)
    out["hmac_sha256_us_per_mb"] = round(_per_call_us(lambda: hmac.digest(secret, big, "sha256"), 5) / 16, 1)
    out["bytes_copy_us_per_mb"] = round(_per_call_us(lambda: bytes(bytearray(big)), 5) / 32, 1)  # two copies
    pickled = _per_call_us(lambda: cloudpickle.dumps(big, protocol=5), 5)
    out["cloudpickle_dumps_bytes_us_per_mb"] = round(pickled / 16, 1)
    out.update(await _thread_hop())
    return out


async def _thread_hop() -> dict[str, float]:
    """A sync call's hop to a worker thread and back: through the runner's own pool
    (``ElasticThreadPool.run``, an asyncio future set from the thread), and through
    ``run_in_executor`` on a stdlib pool, the baseline it replaced."""
    loop = asyncio.get_running_loop()
    ours = ElasticThreadPool(loop, max_workers=512)  # as the runner's session makes it
    stdlib = ThreadPoolExecutor(max_workers=512)
    out: dict[str, float] = {}
    try:
        hops = (("", lambda: ours.run(int)), ("_run_in_executor", lambda: loop.run_in_executor(stdlib, int)))
        for label, hop in hops:
            await hop()
            start = now()
            for _ in range(2000):
                await hop()
            out[f"thread_hop_sequential{label}_us"] = round((now() - start) / 2000 * 1e6, 1)
            start = now()
            for _ in range(10):
                await asyncio.gather(*(hop() for _ in range(200)))
            out[f"thread_hop_200_concurrent{label}_us"] = round((now() - start) / 2000 * 1e6, 1)
    finally:
        ours.shutdown()
        stdlib.shutdown()
    return out
