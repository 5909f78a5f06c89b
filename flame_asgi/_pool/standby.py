"""``Standby``: runners a backend has prepared ahead (created, not started) for the next boots.

A backend that can create a runner without starting it (a Docker container, a Fly
Machine with ``skip_launch``) takes ``standby=N``. The pool then keeps ``N`` runner specs
prepared: each has its runner id and keys already, so the backend could create everything
but the start. A boot takes the oldest prepared spec, and its ``boot()`` is only a start;
the pool prepares a new one behind it in the background. A prepared runner costs no CPU
and no memory (a container's writable layer, a stopped machine's root filesystem), and
counts toward nothing: it is not a runner of the pool until it boots.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from flame_asgi.backends import Backend, RunnerSpec

log = logging.getLogger("flame_asgi.pool")


class Standby:
    """The specs prepared on one pool's backend, oldest first."""

    def __init__(self, pool: str, backend: Backend) -> None:
        self.pool = pool
        self.backend = backend
        self._ready: collections.deque[RunnerSpec] = collections.deque()
        self._preparing = 0
        self._generation = 0  # bumped by clear(): a prepare begun before it keeps nothing

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> RunnerSpec | None:
        """The oldest prepared spec (its boot is only a start), or ``None``."""
        return self._ready.popleft() if self._ready else None

    def top_up(self, make_spec: Callable[[], Awaitable[RunnerSpec]],
               spawn: Callable[[Awaitable[Any]], object]) -> None:
        """Prepare, in the background, as many specs as it takes to have ``standby`` ready.

        Called when the pool opens and after each boot, never after a failed prepare: a
        backend that refuses is asked again at the next boot, not in a loop.
        """
        while len(self._ready) + self._preparing < self.backend.standby:
            self._preparing += 1
            spawn(self._prepare(make_spec))

    def clear(self) -> None:
        """Forget the prepared specs (the pool closes: the backend's ``aclose`` removes them),
        and those still being prepared when they are done."""
        self._ready.clear()
        self._generation += 1

    async def _prepare(self, make_spec: Callable[[], Awaitable[RunnerSpec]]) -> None:
        generation = self._generation
        try:
            spec = await make_spec()
            await self.backend.prepare(spec)
        except Exception as exc:
            # Not fatal: the next boot creates its runner whole, as without standby.
            log.warning("pool %r: could not prepare a standby runner: %s", self.pool, exc)
        else:
            if generation == self._generation:  # else cleared meanwhile: its runner is gone with the backend
                self._ready.append(spec)
        finally:
            self._preparing -= 1
