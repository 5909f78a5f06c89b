"""What FlyBackend reads from the Machines API without calling it: errors, exits, tokens, backoff."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import httpx

from flame_asgi._base.exceptions import FlyAPIError
from flame_asgi._base.settings import setting
from flame_asgi._wire.exits import ExitReason

__all__ = ["api_error", "authorization", "backoff", "describe_machine", "env_int"]


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
