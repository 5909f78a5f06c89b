"""FlyBackend's machines between runners: prepared for the next one, or stopped after the last.

With ``FlyBackend(standby=N)`` a boot starts a machine that already exists instead of
creating one. ``prepare`` readies a machine for a runner without starting it: it updates
a stopped machine with the runner's config (``skip_launch``), or creates one with
``skip_launch``. A runner's machine that stops is kept (up to ``N``) to be prepared again.
Kept machines are destroyed when the backend closes. A parent that is killed cannot
destroy its machines, so the next parent sweeps them: machines created or stopped whose
parent machine is no longer started (``sweep``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from flame_asgi._base.exceptions import BootError
from flame_asgi.backends._fly_api import MachinesClient

log = logging.getLogger("flame_asgi.backends.fly")
RETRY_CREATE = frozenset({409, 412, 422, 429})  # conflicts, capacity, rate limits: worth another try
PARENT_KEY = "flame_parent_machine"  # in a runner machine's metadata: the parent's machine id


class MachineStandby:
    """The machines one FlyBackend holds that run no runner: prepared ones and stopped ones."""

    def __init__(self, api: MachinesClient, size: int) -> None:
        self.api = api
        self.size = size
        self.prepared: dict[str, dict[str, Any]] = {}  # runner id -> its machine, created, not started
        self.stopped: list[str] = []  # machine ids of ended runners, to prepare again

    @property
    def base(self) -> str:
        return f"/v1/apps/{self.api.fly_app}/machines"

    async def prepare(self, runner_id: str, body: Mapping[str, Any]) -> None:
        """A machine for ``runner_id`` with ``body``'s config, not started: a stopped one
        updated, else a new one."""
        while self.stopped:
            machine_id = self.stopped.pop()
            try:
                update = {key: value for key, value in body.items() if key != "name"}
                machine = await self.api.request("POST", f"{self.base}/{machine_id}",
                                                 json={**update, "skip_launch": True})
            except BootError as exc:  # destroyed meanwhile, or refused: take the next, or create
                log.info("could not reuse stopped Fly machine %s: %s", machine_id, exc)
                await self.api.destroy(machine_id)
                continue
            self.prepared[runner_id] = machine
            return
        self.prepared[runner_id] = await self.api.request("POST", self.base, json={**body, "skip_launch": True},
                                                          retry_on=RETRY_CREATE)

    async def start(self, runner_id: str) -> dict[str, Any] | None:
        """Start the machine prepared for ``runner_id`` (``None`` if there is none)."""
        machine = self.prepared.pop(runner_id, None)
        if machine is None:
            return None
        try:
            await self.api.request("POST", f"{self.base}/{machine['id']}/start")
        except BaseException:
            await asyncio.shield(self.api.destroy(machine["id"]))
            raise
        return machine

    def keep(self, machine_id: str) -> bool:
        """Keep a stopped runner's machine for a later runner, if fewer than ``size`` are kept."""
        if len(self.stopped) >= self.size:
            return False
        self.stopped.append(machine_id)
        return True

    async def sweep(self, own_machine: str | None) -> int:
        """Destroy the created or stopped runner machines whose parent machine is not started."""
        machines = await self.api.request("GET", self.base)
        started = {m.get("id") for m in machines if m.get("state") == "started"}
        orphans = [m["id"] for m in machines
                   if m.get("state") in ("created", "stopped")
                   and (parent := ((m.get("config") or {}).get("metadata") or {}).get(PARENT_KEY))
                   and parent != own_machine and parent not in started]
        await asyncio.gather(*(self.api.destroy(machine_id) for machine_id in orphans))
        if orphans:
            log.info("FlyBackend: destroyed %d runner machine(s) left by a parent that is gone", len(orphans))
        return len(orphans)

    async def aclose(self) -> None:
        """Destroy every machine held: prepared and stopped."""
        held = [m["id"] for m in self.prepared.values()] + self.stopped
        self.prepared.clear()
        self.stopped.clear()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(self.api.destroy(machine_id) for machine_id in held))
