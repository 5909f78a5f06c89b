"""``relay(websocket, work)``: live progress from a runner to a browser, in one line.

Forwards a placed child's progress events (or a stream's items) to an accepted
WebSocket as JSON, then its result or error, and closes. If the browser goes away (or
sends ``"cancel"``), the work is cancelled, which stops it on the runner, whether it was
started with ``link=True`` or not: the browser was its only consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi.encoders import jsonable_encoder
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from flame_asgi._pool.child import ChildHandle
from flame_asgi._pool.stream import RemoteStream


async def relay(websocket: WebSocket, work: ChildHandle | RemoteStream) -> Any:
    """Forward ``work`` to an accepted ``websocket`` until it ends or the browser leaves.

    Messages: ``{"event": e}`` per progress event (of a child, or of a stream not yet
    started), ``{"item": x}`` per item of a stream, then ``{"result": r}`` (``{"done": true}`` for a stream) or
    ``{"error": {"type", "message"}}``; the socket is then closed (code 1000, or 1011
    after an error). Returns the child's result (``None`` for a stream, or when the
    browser left: the work is then cancelled); re-raises the work's error after telling
    the browser.
    """
    watcher = asyncio.create_task(_browser_gone(websocket))
    forwarder = asyncio.create_task(_forward(websocket, work))
    try:
        done, _ = await asyncio.wait({watcher, forwarder}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the route itself was cancelled: so is the work
        forwarder.cancel()
        work.cancel()
        raise
    finally:
        watcher.cancel()
    # The browser left or asked to cancel (sending to a browser that has gone raises
    # WebSocketDisconnect, possibly before the watcher has seen it go): stop the remote work.
    if forwarder not in done or isinstance(forwarder.exception(), WebSocketDisconnect):
        forwarder.cancel()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await forwarder
        await _close(websocket, 1000)
        return None
    try:
        result = forwarder.result()
    except Exception as exc:
        await _send(websocket, {"error": {"type": type(exc).__name__, "message": str(exc)}})
        await _close(websocket, 1011)
        raise
    await _close(websocket, 1000)
    return result


async def _forward(websocket: WebSocket, work: ChildHandle | RemoteStream) -> Any:
    if isinstance(work, RemoteStream):
        work.forward_progress(lambda event: websocket.send_json({"event": jsonable_encoder(event)}))
        async for item in work:
            await websocket.send_json({"item": jsonable_encoder(item)})
        await websocket.send_json({"done": True})
        return None
    async for event in work:
        await websocket.send_json({"event": jsonable_encoder(event)})
    result = await work
    await websocket.send_json({"result": jsonable_encoder(result)})
    return result


async def _browser_gone(websocket: WebSocket) -> None:
    """Return when the browser disconnects or sends "cancel"; ignore anything else."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if (message.get("text") or "").strip().strip('"').lower() == "cancel":
            return


async def _send(websocket: WebSocket, message: dict[str, Any]) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await websocket.send_json(message)


async def _close(websocket: WebSocket, code: int) -> None:
    if websocket.application_state != WebSocketState.DISCONNECTED:
        # WebSocketDisconnect: the browser has gone, which Starlette only learns by sending.
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await websocket.close(code)
