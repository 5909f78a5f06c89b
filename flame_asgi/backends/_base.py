"""The backend contract: boot a copy of the app as a runner, reach it, stop it.

A backend is one small class; each implementation lives in its own module beside this
one. The pool owns scaling and the channel protocol; a backend only starts processes
(or containers, Pods, machines) and hands back a ``RunnerHandle`` that can open the
channel, say how the runner ended (an ``ExitReason``), and stop it. What several
backends share (the runner's command line, finding the app, waiting for it to answer)
lives in ``_toolkit``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, ClassVar

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from flame_asgi._base.exceptions import BootError
from flame_asgi._base.parent import ParentInfo
from flame_asgi._base.settings import PARENT, RUNNER_KEYS
from flame_asgi._wire.channel import Channel, WebSocketClientChannel
from flame_asgi._wire.exits import ExitReason
from flame_asgi._wire.keys import AUTH_HEADER, RunnerKeys
from flame_asgi.backends._apps import BARE_APP, app_import_for


@dataclasses.dataclass(frozen=True)
class RunnerSpec:
    """Everything a backend needs to boot one runner."""

    pool: str
    runner_id: str
    info: ParentInfo
    app: str | None  # import string of the app ("pkg.module:app"), when known
    boot_timeout: float | None
    secret: str = dataclasses.field(repr=False)  # the parent's root key: never logged, shown or sent

    @functools.cached_property
    def keys(self) -> RunnerKeys:
        """This runner's own keys, derived from the root secret."""
        return RunnerKeys.derive(self.secret.encode(), self.runner_id)

    @property
    def env(self) -> dict[str, str]:
        """The variables every runner gets: its parent's information and its own keys (not the root)."""
        return {PARENT.name: self.info.encode(), RUNNER_KEYS.name: self.keys.encode()}

    def upgrade_token(self) -> str:
        """A fresh single-use token that lets the parent's connection through the runner's door."""
        return self.keys.upgrade_token()


class RunnerHandle(abc.ABC):
    """A booted (or booting) runner as its backend sees it."""

    url: str | None = None

    @abc.abstractmethod
    async def connect(self, timeout: float | None) -> Channel:
        """Open the channel to the runner, waiting for it to come up within ``timeout``."""

    @abc.abstractmethod
    async def stop(self, timeout: float) -> None:
        """Stop the runner (gracefully, then by force after ``timeout``) and release it."""

    async def exit_reason(self) -> ExitReason | None:
        """How the runner ended (exit code, signal, OOM), when the backend can tell."""
        return None


class Backend(abc.ABC):
    """Base class of every backend. Subclasses set ``name`` and implement ``boot``."""

    name: ClassVar[str]
    heartbeat_interval: float = 2.5
    heartbeat_timeout: float = 10.0
    stop_timeout: float = 5.0  # how long a stopping runner gets before it is killed
    # How long a lost runner's calls wait for ``exit_reason`` to say how it ended. A node
    # agent that reports exits on a period (the kubelet) needs longer than a process table.
    describe_loss_timeout: float = 1.5
    boots_app: ClassVar[bool] = True  # runners boot the app by its import string (not LocalBackend)
    # Runners kept prepared ahead (created, not started: a container, a stopped machine),
    # so a boot is a start. Only backends that implement ``prepare`` take it as an option.
    standby: int = 0
    _app: str | None = None  # the import string given as app=, or found by bind()

    def bind(self, pool: str, app: Any | None) -> None:
        """Called by the pool that owns this backend, with the app it serves (if any)."""
        if self.boots_app and self._app is None and app is not None:
            self._app = app_import_for(app, pool)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called when the owning pool starts (after ``bind``): prepare what boots need."""

    def app_import(self) -> str | None:
        """The import string runners boot ("pkg.module:app"), ``None`` if they boot no app."""
        return self.runner_app() if self.boots_app else None

    def runner_app(self) -> str:
        """The app a runner boots: the pool's app, else an empty one that serves only ``/_flame``."""
        return self._app or BARE_APP

    async def prepare(self, spec: RunnerSpec) -> None:  # noqa: B027 - optional hook
        """Get ``spec``'s runner ready to start (created, not started), so that ``boot(spec)``
        only starts it. The pool prepares ``standby`` specs ahead and boots them later, in
        the order prepared; what is prepared and never booted is released by ``aclose``."""

    @abc.abstractmethod
    async def boot(self, spec: RunnerSpec) -> RunnerHandle:
        """Start one runner (the one ``prepare(spec)`` made ready, if it did). Raise BootError
        with the reason when the backend refuses."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (clients, sockets). Runners are stopped first."""


async def connect_websocket(url: str, timeout: float | None, max_payload: int, spec: RunnerSpec) -> Channel:
    """Open the channel to a runner's ``/_flame/ws`` endpoint (shared by URL-based backends),
    with a fresh upgrade token: the runner refuses any upgrade without one."""
    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/_flame/ws"
    try:
        ws = await connect(
            ws_url,
            additional_headers={AUTH_HEADER: spec.upgrade_token()},
            max_size=max_payload + 64 * 1024,
            compression=None,  # payloads are pickles: rarely worth deflating, always costly
            ping_interval=None,  # the channel has its own signed heartbeat
            open_timeout=timeout,
            max_queue=64,
            write_limit=2**20,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise BootError(
            f"the runner at {url} answered HTTP {status} on /_flame/ws: is it a flame_asgi.FastAPI "
            "app started with FLAME_PARENT set?",
            reason=f"HTTP {status}",
        ) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise BootError(f"could not reach the runner at {url}: {exc!r}", reason=repr(exc)) from None
    return WebSocketClientChannel(ws)
