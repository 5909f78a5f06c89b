"""What the backends share: finding the app, the runner's command line, its environment,
names, waiting until its app answers, and the last-resort cleanup at interpreter exit.

With these, a backend is its ``boot``, its handle's ``stop`` and ``exit_reason``, and
whatever its platform's API needs; nothing here knows any platform.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable

from flame_asgi._base.exceptions import BootError
from flame_asgi._base.parent import ENV_CODE_VERSION
from flame_asgi._wire.channel import Channel
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._base import RunnerSpec, connect_websocket

log = logging.getLogger("flame_asgi.backends")
# Settings a runner must share with its parent: the code fingerprint they compare, and the
# frame size limit both sides enforce. A backend whose runners do not inherit the parent's
# environment (containers, Pods, machines) passes these on.
FORWARDED_ENV = (ENV_CODE_VERSION, "FLAME_MAX_PAYLOAD")
WS_HEADROOM = 64 * 1024  # a frame's header and MAC on top of the largest payload


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def graceful_seconds(stop_timeout: float) -> int:
    """uvicorn's graceful shutdown takes whole seconds: round up, so 1.5 s is never cut to 1."""
    return max(1, math.ceil(stop_timeout))


def uvicorn_command(python: str, app: str, *, host: str, port: int, log_level: str, max_payload: int,
                    stop_timeout: float) -> list[str]:
    """The command line of a runner that serves ``app`` under uvicorn on ``host:port``.

    ``flame_asgi.backends._serve``, not ``python -m uvicorn``: the same uvicorn, whose main
    loop sleeps until a signal instead of waking ten times a second for the runner's life
    (lifespan on, no access log, no per-message deflate, as a runner wants).
    """
    return [python, "-m", "flame_asgi.backends._serve", app, "--host", host, "--port", str(port),
            "--log-level", log_level, "--ws-max-size", str(max_payload + WS_HEADROOM),
            "--graceful", str(graceful_seconds(stop_timeout))]


def same_python(image: str | None, own_image: str | None) -> str:
    """The parent's own image has this very interpreter; another image has ``python`` on its PATH."""
    return sys.executable if not image or image == own_image else "python"


def dns_name(runner_id: str, prefix: str = "flame-") -> str:
    """``runner_id`` as an RFC 1123 label (Pods, Secrets, machines): lower case, ``-``, 63 chars."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}{runner_id}".lower()).strip("-")[:63].rstrip("-")


# -- waiting for the app to answer -----------------------------------------------------------------
async def connect_when_up(url: str, timeout: float | None, spec: RunnerSpec, *,
                          ended: Callable[[], Awaitable[ExitReason | None]], what: str, hint: str = "",
                          check_every: float = 1.0, output: Callable[[], str] | None = None) -> Channel:
    """Open the channel to ``url`` once the runner's app listens.

    A platform gives a runner its address before its app listens (a published port, a Pod
    IP, a machine's address), so a refused or dropped connection means "not yet": try
    again, backing off, until ``timeout``. Every ``check_every`` seconds, and after each
    failure once that long has passed, ``ended()`` asks the platform whether the runner
    is gone; if so the boot fails at once, saying how it ended (and its last ``output``).
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    delay, check_at = 0.02, loop.time()
    while True:
        left = None if deadline is None else deadline - loop.time()
        try:
            return await connect_websocket(url, None if left is None else max(0.1, min(left, 5.0)),
                                           spec.info.max_payload, spec)
        except BootError as error:
            if error.reason.startswith("HTTP "):  # something answers there, and it is not a runner
                raise
            last = error
        if loop.time() >= check_at:
            check_at = loop.time() + check_every
            reason = await ended()
            if reason is not None:
                tail = f"; its last output:\n{output()}" if output is not None else ""
                raise BootError(f"{what} ended during boot: {reason}{tail}", reason=reason.detail)
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= delay:
            tail = f"\nrunner output so far:\n{output()}" if output is not None else ""
            raise BootError(f"{what} did not answer at {url}: {last.reason}{'; ' + hint if hint else ''}{tail}",
                            reason=last.reason)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# -- the last guard: at interpreter exit, remove what this process still has running ----------------
_sweeps: dict[str, tuple[int, Callable[[], object]]] = {}  # key -> (pid that registered it, sweep)


def sweep_at_exit(key: str, sweep: Callable[[], object]) -> None:
    """Run ``sweep()`` (synchronous, no event loop) at interpreter exit, in this process only:
    a forked child must not remove its parent's runners. ``forget_sweep(key)`` cancels it."""
    if not _sweeps:
        atexit.register(_run_sweeps)
    _sweeps[key] = (os.getpid(), sweep)


def forget_sweep(key: str) -> None:
    _sweeps.pop(key, None)


def _run_sweeps() -> None:
    for pid, sweep in list(_sweeps.values()):
        if pid == os.getpid():
            with contextlib.suppress(Exception):
                sweep()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a host-network runner binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
