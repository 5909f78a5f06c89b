"""A parent process for the parent-death tests: boot runners, say who they are, block.

``python -m tests.reliability.parent_script OUT N HEARTBEAT_TIMEOUT`` starts a pool of N
ProcessBackend runners, runs one call on each, writes ``{"parent": pid, "runners":
[pids]}`` to OUT, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from flame_asgi import FlamePool, ProcessBackend
from tests.reliability import work


async def main(out: str, n: int, heartbeat_timeout: float) -> None:
    backend = ProcessBackend(heartbeat_interval=0.2, heartbeat_timeout=heartbeat_timeout)
    async with FlamePool("orphans", backend=backend, min=n, max=n, max_concurrency=1,
                         idle_shutdown_after=None, boot_timeout=30) as pool:
        runners = await asyncio.gather(*(pool.call(work.pid) for _ in range(n)))
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"parent": os.getpid(), "runners": sorted(set(runners))}, f)
        os.rename(tmp, out)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
