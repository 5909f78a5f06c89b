"""A network partition between parent and runner (a network namespace cut off with
iptables): both sides notice within the heartbeat timeout, calls in flight fail with
``RunnerLost``, nothing hangs, and the pool serves calls again once the network heals."""

from __future__ import annotations

import asyncio
import pathlib
import time
from typing import Any

from flame_asgi import FlamePool, RunnerLost
from tests.reliability import work
from tests.reliability.netns import Netns, NetnsBackend
from tests.reliability.support import active, booted, connections_to, failures, in_flight, until


async def _drop_connection(conn: Any) -> None:
    """Abort the parent's socket to a lost runner, in case the test failed before the pool
    did (the pool aborts it itself since BUG-1, see docs/reliability.md)."""
    conn._channel._ws.transport.abort()
    await asyncio.sleep(0.05)


async def test_a_partition_fails_calls_in_flight_and_the_pool_recovers_when_healed(
        netns: Netns, tmp_path: pathlib.Path) -> None:
    # stoppable=False: the parent cannot stop a runner it cannot reach (as with a real
    # remote machine), so the runner must notice the partition and exit by itself.
    backend = NetnsBackend(netns, heartbeat_interval=0.3, heartbeat_timeout=1.5, stoppable=False)
    conn = None
    try:
        async with asyncio.timeout(60), FlamePool("partition", backend=backend, max_concurrency=10,
                                                  boot_timeout=15) as pool:
            assert await pool.call(work.square, 3) == 9
            calls = await in_flight(pool, tmp_path, 3)
            (conn,) = [r.conn for r in booted(pool)]
            runner = backend.handles[0]
            cut = time.monotonic()
            netns.partition()
            failed = await failures(calls)
            detected = max(at for _, at in failed) - cut
            for exc, _ in failed:
                assert isinstance(exc, RunnerLost)
                assert "no heartbeat for 1.5 s (network partition or hung runner)" in str(exc)
            assert pool.stats().runners == [] and active(pool) == 0
            await until(lambda: runner.proc.returncode is not None, 15, "the cut-off runner to exit by itself")
            exited = time.monotonic() - cut
            print(f"\npartition -> in-flight calls failed after {detected:.2f} s; the runner exited by "
                  f"itself {exited:.2f} s after the cut (heartbeat_interval=0.3 s, heartbeat_timeout=1.5 s)")
            assert detected < 1.5 + 2 * 0.3 + 1.5 + 1.0  # timeout + ticks + exit_reason grace + slack
            assert exited < 1.5 + 2 * 0.3 + 3.0
            netns.heal()
            assert await pool.call(work.square, 4) == 16  # a new runner, reachable again
            assert len(backend.handles) == 2
    finally:
        if conn is not None:
            await _drop_connection(conn)
        await backend.kill_all()


async def test_the_socket_to_a_lost_runner_is_closed_by_the_time_the_pool_is(netns: Netns) -> None:
    backend = NetnsBackend(netns, heartbeat_interval=0.3, heartbeat_timeout=1.5, stoppable=False)
    conn = None
    try:
        async with asyncio.timeout(30), FlamePool("lost-socket", backend=backend) as pool:
            await pool.call(work.square, 2)
            (conn,) = [r.conn for r in booted(pool)]
            netns.partition()
            await until(lambda: not pool.stats().runners, 10, "the partition to be detected")
        assert connections_to(netns.runner_addr) == []
    finally:
        if conn is not None:
            await _drop_connection(conn)
        await backend.kill_all()
