"""Liveness between a parent and a runner of one host, with no frame while the channel is idle.

Each end of a channel shows the other it is alive by a ``ping`` frame every heartbeat
interval. A frame costs both processes a signature, a WebSocket send and a receive: about
a tenth of a millisecond each way, per runner, every interval, which is what an idle
parent with hundreds of runners spends its CPU on. Between two processes of one host the
same news is one store to memory: each end keeps a *beacon*, 8 bytes in a ``memfd`` of
its own holding the ``CLOCK_MONOTONIC`` time of its last heartbeat tick, written by its
event loop (so a blocked loop stops it, as it stops the pings), and maps the peer's
beacon read-only. While nothing is in flight, a fresh peer beacon counts as a heartbeat
and no ping is sent; as soon as a call, a transfer or an unacknowledged shared-memory
payload is in flight, the pings resume, because only frames prove that the *channel*
still carries messages. Beacons are used only where both ends read the other's memfds
(the shared-memory probe) and each sees the other at a loopback address: a runner in
another network namespace (which iptables can cut off while both beacons stay fresh), a
container or another host pings as always. What that leaves unseen: a loopback channel
cut while idle (a firewall rule on ``lo``, a proxy in between that hangs), which the next
call finds within the heartbeat timeout.

One side may have something in flight while the other has nothing (an Upload the runner
holds but has not read yet, a reply on its way): so the pings of a side with something in
flight ask for an answer (``r``), which the other side sends at once, whatever its own
state, and a side whose work has just begun reads the peer's beacon one last time and
pings at once, so that its silence is counted from then, not from the last frame of long
ago.

Who may do what: a beacon is named only in a signed handshake frame, and opened through
``/proc/<pid>/fd``, which only the same user (the kernel's ptrace check) may do; such a
process can already signal either end. A beacon holds a number, never code: at worst a
forged stamp keeps a dead peer alive until the next call, or ends a session.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
import time
from typing import Any

_STAMP = struct.Struct("=d")
_SIZE = _STAMP.size
_LET_GO = 0.0  # written as the last stamp: "do not wait for me", read as infinitely old


class Beacon:
    """This end's stamp: a memfd of its own, mapped read-write, that the peer maps read-only."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("flame-liveness", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, _SIZE)
            self._map: mmap.mmap | None = mmap.mmap(self._fd, _SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        self.stamp()

    def ref(self) -> dict[str, int]:
        """What the handshake frame names, for the peer to open."""
        return {"pid": os.getpid(), "fd": self._fd, "ino": os.fstat(self._fd).st_ino}

    def stamp(self) -> None:
        if self._map is not None:
            _STAMP.pack_into(self._map, 0, time.monotonic())

    def close(self) -> None:
        """Let go: the peer reads the beacon as stale from its next tick on."""
        if self._map is not None:
            _STAMP.pack_into(self._map, 0, _LET_GO)
            self._map.close()
            self._map = None
            os.close(self._fd)


class PeerBeacon:
    """The peer's stamp, mapped read-only."""

    def __init__(self, view: mmap.mmap) -> None:
        self._map: mmap.mmap | None = view

    @classmethod
    def open(cls, ref: Any) -> PeerBeacon | None:
        """Map the beacon a verified frame names; None if it cannot be (another host, a
        container, a peer that sent none): the channel then pings as it always has."""
        if not isinstance(ref, dict):
            return None
        try:
            pid, fd, ino = (int(ref[k]) for k in ("pid", "fd", "ino"))
            mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except (KeyError, TypeError, ValueError, OSError):
            return None
        try:
            st = os.fstat(mine)
            if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or st.st_size != _SIZE:
                return None
            return cls(mmap.mmap(mine, _SIZE, prot=mmap.PROT_READ))
        except OSError:
            return None
        finally:
            os.close(mine)

    def age(self) -> float:
        """Seconds since the peer's last stamp (infinite once it let go or if it reads as nonsense)."""
        if self._map is None:
            return math.inf
        (stamp,) = _STAMP.unpack_from(self._map, 0)
        age = time.monotonic() - stamp
        # A stamp from the future is no proof of anything (the same clock ticks for both):
        # read it as a fresh one only within a second of now.
        return max(age, 0.0) if math.isfinite(age) and age > -1.0 and stamp != _LET_GO else math.inf

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class Beacons:
    """One channel end's beacon and its peer's, and the rule that rests on them."""

    def __init__(self, mine: Beacon, peer: PeerBeacon) -> None:
        self._mine = mine
        self._peer = peer
        self._busy = False  # something was in flight at the last tick

    def tick(self, now: float, last_seen: float, in_flight: bool) -> tuple[float, bool]:
        """Stamp ours. Return when the peer was last seen alive, on the caller's clock (the
        beacon counts while nothing is in flight, and once more at the tick that finds
        something newly in flight), and whether to ping now, asking for an answer (that
        same tick: the peer is to show the channel works from here on)."""
        self._mine.stamp()
        began = in_flight and not self._busy
        self._busy = in_flight
        if not in_flight or began:
            last_seen = max(last_seen, now - self._peer.age())
        return last_seen, began

    def close(self) -> None:
        self._mine.close()
        self._peer.close()


def heartbeat(beacons: Beacons | None, now: float, last_seen: float, *, in_flight: bool, due: bool,
              owes_ack: bool) -> tuple[float, dict[str, Any] | None]:
    """One heartbeat tick of either end: when the peer was last seen alive, and the fields
    of the ping to send now, or None for none.

    Without beacons, a plain ping whenever one is due. With them: while idle, none, except
    a plain one while the peer keeps a shared-memory payload that only our next frame
    releases (``owes_ack``); while busy, one asking for an answer (``r``) when due, and at
    once on the tick that finds work newly in flight."""
    if beacons is None:
        return last_seen, {} if due else None
    last_seen, began = beacons.tick(now, last_seen, in_flight)
    if not in_flight:
        return last_seen, {} if owes_ack else None
    return last_seen, {"r": True} if began or due else None
