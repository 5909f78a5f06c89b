"""Helpers shared by the reliability tests: processes, sockets, waiting."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from flame_asgi import FlamePool
from tests.reliability import work


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a process this test started; it may already be gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Wait for ``predicate``; return how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def booted(pool: FlamePool) -> list[Any]:
    """The pool's booted runners, with their (private) ``handle`` and ``conn``."""
    return list(pool._runners)


def runner_pids(pool: FlamePool) -> dict[str, int]:
    """Runner id -> process id of every booted ProcessBackend runner of ``pool``."""
    return {r.id: r.handle.proc.pid for r in booted(pool)}


def active(pool: FlamePool) -> int:
    return sum(r.active for r in pool.stats().runners)


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open (none once it is gone)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp_sockets(pid: int) -> list[tuple[str, tuple[str, int], tuple[str, int]]]:
    """(state, local, remote) of every TCP socket process ``pid`` holds open."""
    inodes = socket_inodes(pid)
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                lines = list(f)
        except FileNotFoundError:  # it exited between the two reads: a gone process holds no socket
            return []
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                found.append((fields[3], _address(fields[1], family), _address(fields[2], family)))
    return found


def _address(field: str, family: int) -> tuple[str, int]:
    hex_addr, hex_port = field.split(":")
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints host-order words
    return socket.inet_ntop(family, raw), int(hex_port, 16)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket ``pid`` listens on (IPv4 and IPv6)."""
    return [local for state, local, _ in _tcp_sockets(pid) if state == "0A"]  # 0A = LISTEN


def connections_to(address: str) -> list[tuple[str, int]]:
    """This process's open TCP connections to ``address`` (their remote ends)."""
    return [remote for state, _, remote in _tcp_sockets(os.getpid()) if state != "0A" and remote[0] == address]


async def in_flight(pool: FlamePool, tmp: pathlib.Path, n: int) -> list[asyncio.Task[Any]]:
    """Start ``n`` calls that hold until cancelled; return once all run on a runner."""
    marks = [tmp / f"started-{i}" for i in range(n)]
    calls = [asyncio.create_task(pool.call(work.hold, str(m), timeout=60)) for m in marks]
    await until(lambda: all(m.exists() for m in marks), 30, f"{n} calls to start")
    return calls


async def failures(calls: list[asyncio.Task[Any]]) -> list[tuple[BaseException, float]]:
    """Each call's exception and the time.monotonic() when it arrived; none may succeed."""
    out = []
    for task in asyncio.as_completed(calls):
        try:
            await task
        except BaseException as exc:
            out.append((exc, time.monotonic()))
        else:
            raise AssertionError("a call on a lost runner returned a result")
    return out
