"""Runner mode: the internal ``/_flame`` endpoints and the runner's own watchdog.

With ``FLAME_PARENT`` set, the app serves only ``/_flame/ws`` (the signed channel to its
parent) and ``/_flame/health``; every other route answers 404. The host accepts exactly
one parent session, whose first message must be a hello signed with the channel key for
this runner's id. It exits the process when that session ends, and after the failsafe
period if the parent never completes a handshake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading

from starlette.types import Receive, Scope, Send

from flame_asgi._channel import ASGIWebSocketChannel
from flame_asgi._parent import ParentInfo, parent
from flame_asgi._settings import SECRET
from flame_asgi._telemetry import emit
from flame_asgi._worker import RunnerSession

log = logging.getLogger("flame_asgi.runner")
PREFIX = "/_flame"


class RunnerHost:
    def __init__(self, info: ParentInfo, secret: str) -> None:
        self.info = info
        self._secret = secret.encode()
        self.attached = False
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
                await self._websocket(receive, send)
            else:
                await send({"type": "websocket.close", "code": 4404})
            return
        if scope["type"] != "http":
            return
        if path == f"{PREFIX}/health":
            body = {"status": "ok", "runner_id": self.info.runner_id, "pool": self.info.pool,
                    "attached": self.attached}
            await _respond(send, 200, body)
        else:
            await _respond(send, 404, {"detail": "Not Found (runner mode: web routes are disabled)"})

    async def _websocket(self, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        if self.attached or self._exiting:
            await send({"type": "websocket.close", "code": 4409, "reason": "this runner already has its parent"})
            return
        await send({"type": "websocket.accept"})
        session = RunnerSession(self.info, self._secret, on_ready=self._on_ready)
        reason = await session.serve(ASGIWebSocketChannel(receive, send))
        emit("runner.session.end", pool=self.info.pool, runner=self.info.runner_id, reason=reason)
        if self.attached:
            log.info("runner %s: session ended (%s); exiting", self.info.runner_id, reason)
            self.exit(reason)
        else:
            log.warning("runner %s: refused a connection: %s", self.info.runner_id, reason)

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
        secret = SECRET.read()
        if not secret:
            raise RuntimeError(
                "FLAME_PARENT is set but FLAME_SECRET is not: a runner needs the channel key its "
                "backend passes; do not set FLAME_PARENT by hand"
            )
        _host = RunnerHost(info, secret)
    return _host
