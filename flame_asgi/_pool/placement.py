"""The two contracts between a pool's parts, so each part needs only these.

A ``Placement`` hands out slots: the pool's ``Slots`` (any free slot) or a lease's
(``FlameRunner``: slots of its one runner). A ``Starter`` starts work on a slot it was
given and observes it: the pool's ``Dispatch``. Streams and leases hold these, never
the pool.
"""

from __future__ import annotations

from typing import Any, Protocol

from flame_asgi._observe.telemetry import CallObserver
from flame_asgi._wire.connection import RemoteCall
from flame_asgi._wire.payload import Payload
from flame_asgi._wire.protocol import WorkKind


class Placement(Protocol):
    """Where work goes: ``checkout(tokens, wait)`` takes a slot, ``release(rid)`` returns it."""

    async def checkout(self, tokens: list[str], wait: float | None) -> str: ...

    def release(self, rid: str) -> None: ...


class Starter(Protocol):
    """Starts work on slot ``rid`` of ``placement``; the RemoteCall then owns the slot."""

    def observe(self, kind: WorkKind, fn: Any) -> CallObserver: ...

    async def start(self, rid: str, kind: WorkKind, payload: Payload, *, link: bool, progress: bool,
                    obs: CallObserver, tokens: list[str], placement: Placement,
                    track: bool = False) -> RemoteCall: ...
