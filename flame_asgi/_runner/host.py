"""Runner mode: the internal ``/_flame`` endpoints and the runner's own watchdog.

With ``FLAME_PARENT`` set, the app serves only ``/_flame/ws`` (the signed channel to its
parent) and ``/_flame/health``; every other route answers 404. The door of ``/_flame/ws``
opens once: the upgrade request must carry a fresh token signed with this runner's
upgrade key (``_keys``), checked before the connection is accepted, so a stranger is
refused at the handshake without the runner reading a byte of its messages, and a
copied token opens nothing. That one session's first message must be a hello signed
with the channel key. The runner exits when the parent's session ends, and after the
failsafe period if the parent never completes a handshake; strangers end nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading

from starlette.types import Receive, Scope, Send

from flame_asgi._base.exceptions import ProtocolError
from flame_asgi._base.parent import ParentInfo, parent
from flame_asgi._base.settings import RUNNER_KEYS
from flame_asgi._observe.telemetry import emit
from flame_asgi._runner.session import RunnerSession
from flame_asgi._wire.channel import ASGIWebSocketChannel
from flame_asgi._wire.keys import AUTH_HEADER, RunnerKeys

log = logging.getLogger("flame_asgi.runner")
PREFIX = "/_flame"


_AUTH = AUTH_HEADER.encode()


class RunnerHost:
    def __init__(self, info: ParentInfo, keys: RunnerKeys) -> None:
        self.info = info
        self._keys = keys
        self.attached = False
        self._claimed = False  # a connection with a valid token holds the door
        self._used: set[str] = set()  # nonces already seen: a token opens the door once
        self.refused = 0  # upgrades refused at the door (strangers, replays)
        self._exiting = False
        self._failsafe: asyncio.TimerHandle | None = None

    def arm_failsafe(self) -> None:
        if self._failsafe is None and not self.attached:
            loop = asyncio.get_running_loop()
            self._failsafe = loop.call_later(self.info.failsafe_timeout, self._failsafe_fired)

    def _failsafe_fired(self) -> None:
        if not self.attached:
            log.error("runner %s: no parent reached it within %g s; exiting", self.info.runner_id,
                      self.info.failsafe_timeout)
            self.exit("failsafe: parent never connected")

    def _on_ready(self) -> None:
        self.attached = True
        if self._failsafe is not None:
            self._failsafe.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "websocket":
            if path == f"{PREFIX}/ws":
                await self._websocket(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 4404})
            return
        if scope["type"] != "http":
            return
        if path == f"{PREFIX}/health":
            # Nothing here tells a stranger when the runner is still unclaimed.
            body: dict[str, object] = {"status": "ok", "runner_id": self.info.runner_id, "pool": self.info.pool}
            await _respond(send, 200, body)
        else:
            await _respond(send, 404, {"detail": "Not Found (runner mode: web routes are disabled)"})

    def _admit(self, scope: Scope) -> str | None:
        """Why this upgrade is refused, or None: decided before accepting, from its headers alone."""
        if self.attached or self._claimed or self._exiting:
            return "this runner already has its parent"
        token = next((v for k, v in scope.get("headers") or () if k == _AUTH), b"")
        try:
            nonce = self._keys.check_upgrade_token(token.decode("latin-1"))
        except ProtocolError as exc:
            return str(exc)
        if nonce in self._used:
            return "replayed upgrade token"
        self._used.add(nonce)
        return None

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        refused = self._admit(scope)
        if refused is not None:
            # Closing before accept answers the upgrade with HTTP 403: no WebSocket, no
            # message read or buffered, no session, nothing for the runner to end.
            self.refused += 1
            log.debug("runner %s: refused an upgrade: %s", self.info.runner_id, refused)
            await send({"type": "websocket.close", "code": 4403})
            return
        self._claimed = True
        await send({"type": "websocket.accept"})
        session = RunnerSession(self.info, self._keys, on_ready=self._on_ready)
        reason = await session.serve(ASGIWebSocketChannel(receive, send, scope.get("client")))
        emit("runner.session.end", pool=self.info.pool, runner=self.info.runner_id, reason=reason)
        if session.ready:  # the parent's own session ended: so does this runner
            log.info("runner %s: session ended (%s); exiting", self.info.runner_id, reason)
            self.exit(reason)
        else:  # the parent's connection broke mid-handshake: it may try again, with a new token
            self._claimed = False
            log.warning("runner %s: a session ended before its handshake: %s", self.info.runner_id, reason)

    def exit(self, reason: str) -> None:
        """Leave through uvicorn's graceful shutdown (the app's lifespan ends), or by force."""
        if self._exiting:
            return
        self._exiting = True
        os.kill(os.getpid(), signal.SIGTERM)
        grace = (self.info.shutdown_timeout or 30.0) + 10.0
        timer = threading.Timer(grace, os._exit, args=(70,))
        timer.daemon = True
        timer.start()


async def _respond(send: Send, status: int, body: dict[str, object]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


_host: RunnerHost | None = None


def runner_host() -> RunnerHost:
    """This process's host (runner mode only), created on first use."""
    global _host
    info = parent()
    if info is None:
        raise RuntimeError("runner_host() outside runner mode")
    if _host is None or _host.info != info:
        encoded = RUNNER_KEYS.take()  # and gone from os.environ: no subprocess inherits it
        if not encoded:
            raise RuntimeError(
                "FLAME_PARENT is set but FLAME_RUNNER_KEYS is not: a runner needs the keys its backend "
                "passes; do not set FLAME_PARENT by hand")
        _host = RunnerHost(info, RunnerKeys.decode(info.runner_id, encoded))
    return _host
