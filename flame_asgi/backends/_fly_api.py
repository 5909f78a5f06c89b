"""FlyBackend's Machines API: the client that calls it (retries, errors that say what to fix),
and what it reads from the answers (errors, exits, tokens, backoff)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import httpx

from flame_asgi._base.exceptions import BootError, FlyAPIError
from flame_asgi._base.settings import setting
from flame_asgi._wire.exits import ExitReason

__all__ = ["MachinesClient", "api_error", "authorization", "backoff", "describe_machine", "env_int"]
log = logging.getLogger("flame_asgi.backends.fly")


class MachinesClient:
    """The Machines API of one Fly app, over one httpx client opened on first use."""

    def __init__(self, api_url: str, token: str, fly_app: str, max_retries: int) -> None:
        self.api_url = api_url
        self.token = token
        self.fly_app = fly_app
        self.max_retries = max_retries
        self._api_client: httpx.AsyncClient | None = None

    async def request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                      retry_on: frozenset[int] = frozenset({429}), timeout: float = 15.0) -> Any:
        """One Machines API call, retried with backoff on ``retry_on`` and failed connects."""
        if self._api_client is None:
            self._api_client = httpx.AsyncClient(base_url=self.api_url, headers={
                "Authorization": authorization(self.token), "User-Agent": "flame_asgi"})
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = await self._api_client.request(method, path, json=json, params=params, timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    raise BootError(f"could not reach the Fly Machines API at {self.api_url}: {exc!r}",
                                    reason=repr(exc)) from None
                await asyncio.sleep(backoff(attempt, None))
                continue
            except httpx.HTTPError as exc:
                raise BootError(f"Fly Machines API: {method} {path} failed: {exc!r}", reason=repr(exc)) from None
            if response.status_code < 400:
                try:
                    return response.json() if response.content else {}
                except ValueError:
                    raise BootError(f"Fly Machines API: {method} {path} answered {response.status_code} with a "
                                    f"body that is not JSON: {response.text[:200]!r}", reason="bad response") from None
            if response.status_code in retry_on and not last:
                log.info("Fly Machines API: %s %s answered %s; retrying", method, path, response.status_code)
                await asyncio.sleep(backoff(attempt, response.headers.get("retry-after")))
                continue
            raise api_error(method, path, response, attempt + 1, self.fly_app)
        raise AssertionError("unreachable")


    async def destroy(self, machine_id: str) -> None:
        try:
            await self.request("DELETE", f"/v1/apps/{self.fly_app}/machines/{machine_id}", params={"force": "true"})
        except FlyAPIError as exc:
            if exc.status != 404:  # 404: it destroyed itself already (auto_destroy)
                log.warning("could not destroy Fly machine %s: %s", machine_id, exc)
        except BootError as exc:
            log.warning("could not destroy Fly machine %s: %s", machine_id, exc)

    async def aclose(self) -> None:
        client, self._api_client = self._api_client, None
        if client is not None:
            await client.aclose()


def api_error(method: str, path: str, response: httpx.Response, attempts: int, fly_app: str) -> FlyAPIError:
    """The error a refused Machines API call raises, saying what to check."""
    status = response.status_code
    try:
        body = response.json()
        detail = str(body.get("error") or body) if isinstance(body, dict) else str(body)
    except ValueError:
        detail = response.text[:500] or response.reason_phrase
    if status in (401, 403):
        message = (f"the Fly Machines API refused the token (HTTP {status}: {detail}); check FLY_API_TOKEN "
                   "(or token=...): it needs access to the app")
    elif status == 404 and path == f"/v1/apps/{fly_app}/machines":
        message = f"Fly app {fly_app!r} not found (HTTP 404: {detail}); check FLY_APP_NAME (or fly_app=...)"
    else:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        message = f"Fly Machines API: {method} {path} answered HTTP {status}{tries}: {detail}"
    return FlyAPIError(message, status=status, detail=detail)


def describe_machine(machine: Mapping[str, Any]) -> ExitReason:
    """How a machine ended, from its state and latest exit event (OOM, signal, exit code)."""
    name = f"Fly machine {machine.get('id')}"
    state = machine.get("state") or "unknown"
    for event in machine.get("events") or ():  # newest first
        if event.get("type") != "exit":
            continue
        request = event.get("request") or {}
        exit_event = request.get("exit_event") or (request.get("MonitorEvent") or {}).get("exit_event") or {}
        code = exit_event.get("exit_code", 0)
        if exit_event.get("oom_killed"):
            return ExitReason("oom", f"{name} was killed: out of memory (raise memory_mb)", code)
        if exit_event.get("signal"):
            return ExitReason("signal", f"{name} was killed by signal {exit_event['signal']}", code,
                              str(exit_event["signal"]))
        return ExitReason("exit", f"{name} exited with code {code} ({state})", code)
    if state == "started":
        return ExitReason("unreachable", f"{name} is still started: its runner became unreachable")
    return ExitReason("gone", f"{name} is {state}")


def authorization(token: str) -> str:
    # Deploy tokens are macaroons ("FlyV1 fm2_..."); older tokens are bearer tokens.
    if token.startswith(("FlyV1 ", "Bearer ")):
        return token
    if token.startswith(("fm1r_", "fm1a_", "fm2_")):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


def backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(10.0, max(0.0, float(retry_after)))
        except ValueError:
            pass
    return min(2.0, 0.1 * 2.0**attempt) * random.uniform(0.75, 1.25)


def env_int(name: str, default: int) -> int:
    value = setting(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None
