"""Liveness without frames on an idle channel between processes of one host: each end
watches the other's beacon (a memfd stamp) instead of pings, and the pings come back as
soon as anything is in flight. What a frozen peer, a beacon let go and a forged
reference do."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from flame_asgi import FlamePool, ProcessBackend, Upload
from flame_asgi._wire.liveness import Beacon, PeerBeacon
from flame_asgi._wire.shm import probe
from tests import remote
from tests.reliability.support import booted, kill, until

INTERVAL, TIMEOUT = 0.1, 0.5


async def settled(conn: Any) -> Any:
    """``conn`` once a ping either end sealed while the last call was in flight has landed:
    a tick of each end has passed since, and the parent's writer is empty."""
    await asyncio.sleep(TIMEOUT)
    await conn._writer.flush()
    return conn


class Frames:
    """Counts the frames one connection sends and receives, by type (it only watches)."""

    def __init__(self, conn: Any) -> None:
        self.received: collections.Counter[str] = collections.Counter()
        self.sent = 0
        opener, channel = conn._opener, conn._channel
        open_, send, send_now = opener.open, channel.send, channel.send_now

        def counting_open(raw: Any) -> Any:
            frame = open_(raw)
            self.received[frame.type] += 1
            return frame

        async def counting_send(data: bytes) -> None:
            self.sent += 1
            await send(data)

        def counting_send_now(data: bytes) -> bool:
            done: bool = send_now(data)
            self.sent += done
            return done

        opener.open, channel.send, channel.send_now = counting_open, counting_send, counting_send_now


@pytest.fixture
async def pool() -> Any:
    backend = ProcessBackend(heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT)
    shrinks: list[dict[str, Any]] = []
    async with FlamePool("liveness", backend=backend, max=1, max_concurrency=2, idle_shutdown_after=None,
                         on_shrink=shrinks.append) as flame:
        flame.shrinks = shrinks  # type: ignore[attr-defined]
        yield flame


async def test_an_idle_runner_on_this_host_sends_and_gets_no_frame_and_stays(pool: FlamePool) -> None:
    first = await pool.call(remote.pid)
    (runner,) = booted(pool)
    assert runner.conn._beacons is not None and runner.conn._channel.loopback
    frames = Frames(await settled(runner.conn))
    await asyncio.sleep(4 * TIMEOUT)  # four silence limits, with no frame either way
    assert frames.sent == 0 and not frames.received
    assert await pool.call(remote.pid) == first and pool.shrinks == []  # type: ignore[attr-defined]


async def test_pings_flow_both_ways_while_a_call_is_in_flight(pool: FlamePool, tmp_path: Any) -> None:
    await pool.call(remote.pid)
    (runner,) = booted(pool)
    frames = Frames(runner.conn)
    await pool.call(remote.sleep_then_touch, 6 * INTERVAL, str(tmp_path / "done"))
    assert frames.received["ping"] >= 2 and frames.received["result"] == 1
    assert frames.sent >= 3  # the call and the parent's pings


async def test_a_side_with_something_in_flight_gets_answers_from_an_idle_side(pool: FlamePool) -> None:
    # The runner holds an Upload it has not read after the call that brought it ended: it
    # has a transfer in flight (it may read at any time), the parent has nothing. It pings
    # and asks for answers; without them it would take its parent for gone.
    assert await pool.call(remote.keep, Upload(b"kept, never read")) == "RemoteBytes"
    (runner,) = booted(pool)
    frames = Frames(await settled(runner.conn))
    await asyncio.sleep(4 * TIMEOUT)
    assert frames.received["ping"] >= 2 and frames.sent >= 2  # its pings, our answers
    assert pool.shrinks == [] and await pool.call(remote.pid) == runner.conn.pid  # type: ignore[attr-defined]


async def test_a_payload_through_shared_memory_is_acknowledged_while_idle(pool: FlamePool) -> None:
    # The runner keeps the memfd of its result until the parent says it read it, in its
    # next frame: on an idle channel that frame is a ping sent for the purpose.
    data = os.urandom(1 << 20)
    assert await pool.call(remote.echo, data) == data
    (runner,) = booted(pool)
    await until(lambda: not runner.conn._shm.owes_ack, 10 * TIMEOUT, "the acknowledgement to go")
    frames = Frames(await settled(runner.conn))
    await asyncio.sleep(3 * INTERVAL)
    assert frames.sent == 0  # and then silence again


async def test_a_frozen_idle_runner_is_lost_at_the_timeout_and_replaced(pool: FlamePool) -> None:
    first = await pool.call(remote.pid)
    kill(first, signal.SIGSTOP)  # its loop stops: so does its beacon
    try:
        # on_shrink, not stats(): the runner leaves stats() at once, on_shrink follows once
        # the backend has said how it ended (up to 1.5 s for a process that is still there)
        await until(lambda: pool.shrinks, 20 * TIMEOUT, "the frozen runner to be lost")  # type: ignore[attr-defined]
        assert pool.stats().runners == []
        (shrink,) = pool.shrinks  # type: ignore[attr-defined]
        assert shrink["reason"] == f"lost: no heartbeat for {TIMEOUT:g} s (network partition or hung runner)"
        assert await pool.call(remote.pid) != first
    finally:
        kill(first, signal.SIGKILL)


def test_a_beacon_reads_fresh_then_stale_once_let_go() -> None:
    beacon = Beacon()
    peer = PeerBeacon.open(beacon.ref())
    assert peer is not None
    try:
        assert 0 <= peer.age() < 1.0
        beacon.close()
        assert peer.age() == float("inf")
    finally:
        peer.close()
    assert peer.age() == float("inf")


def _refs() -> Iterator[tuple[str, Any]]:
    beacon = Beacon()
    good = beacon.ref()
    made = probe()  # a memfd of another size
    assert made is not None
    probe_fd, sealed = made
    yield "not a mapping", [good["pid"], good["fd"], good["ino"]]
    yield "another inode", {**good, "ino": good["ino"] + 1}
    yield "another size", {k: sealed[k] for k in ("pid", "fd", "ino")}
    yield "no such descriptor", {**good, "fd": 10_000}
    yield "no such process", {**good, "pid": 2**22 + 1}
    yield "not numbers", {**good, "fd": "../../etc/passwd"}
    yield "missing a field", {"pid": good["pid"], "fd": good["fd"]}
    os.close(probe_fd)
    beacon.close()


def test_a_reference_that_names_no_beacon_is_refused_not_trusted() -> None:
    for what, ref in _refs():
        assert PeerBeacon.open(ref) is None, what


async def test_a_runner_whose_beacon_the_parent_cannot_read_is_told_to_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runner read the parent's beacon and showed its own, which the parent (here made
    # unable to) could not read: the parent says so, and the runner pings as without one.
    monkeypatch.setattr(PeerBeacon, "open", classmethod(lambda cls, ref: None))
    backend = ProcessBackend(heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT)
    shrinks: list[dict[str, Any]] = []
    async with FlamePool("told", backend=backend, max=1, idle_shutdown_after=None, on_shrink=shrinks.append) as flame:
        first = await flame.call(remote.pid)
        (runner,) = booted(flame)
        assert runner.conn._beacons is None
        frames = Frames(runner.conn)
        await asyncio.sleep(4 * TIMEOUT)
        assert frames.received["ping"] >= 2 and shrinks == [] and await flame.call(remote.pid) == first


async def test_the_parents_ticks_for_every_runner_fall_on_one_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eight runners booted at different moments: the parent's heartbeat ticks for all of
    # them land on the instants of one grid (a step of 0.5 s for a 2 s interval), so one
    # wake of its loop serves them all. Each tick runs at its grid point plus the loop's
    # lateness; without the grid, eight channels' phases would fall anywhere in the step.
    from flame_asgi._base.ticks import grid_step
    from flame_asgi._wire import connection

    interval = 2.0
    step = grid_step(interval)
    ticks: dict[int, list[float]] = collections.defaultdict(list)
    real = connection.heartbeat

    def recording(beacons: Any, now: float, last_seen: float, **kw: Any) -> Any:
        ticks[id(beacons)].append(now)
        return real(beacons, now, last_seen, **kw)

    monkeypatch.setattr(connection, "heartbeat", recording)
    backend = ProcessBackend(heartbeat_interval=interval, heartbeat_timeout=10.0)
    async with contextlib.AsyncExitStack() as stack:
        for n in range(8):  # one runner after another: eight different starting moments
            flame = await stack.enter_async_context(FlamePool(f"grid{n}", backend=backend, max=1,
                                                              idle_shutdown_after=None))
            await flame.call(remote.pid)
            await asyncio.sleep(0.13)
        ticks.clear()
        await asyncio.sleep(2 * interval + 0.5)
    assert len(ticks) == 8 and all(len(t) >= 2 for t in ticks.values()), ticks
    lateness = [now % step for t in ticks.values() for now in t]
    assert max(lateness) < step / 2, sorted(lateness)
