"""Knock on a runner's door as anyone could: a WebSocket upgrade to ``/_flame/ws``."""

from __future__ import annotations

import asyncio

import websockets
from websockets.asyncio.client import connect

from flame_asgi._wire.keys import AUTH_HEADER


async def knock(url: str, frames: list[bytes], token: str | None = None, *, wait: float = 3.0) -> str:
    """Upgrade (with ``token`` if given), send ``frames``, and say how the runner answered:
    ``refused <HTTP status>``, ``reply <n> bytes`` or ``closed <code>``."""
    headers = {AUTH_HEADER: token} if token is not None else {}
    try:
        ws = await connect(url.replace("http://", "ws://", 1) + "/_flame/ws", additional_headers=headers,
                           compression=None, proxy=None, open_timeout=10)
    except websockets.InvalidStatus as exc:
        return f"refused {exc.response.status_code}"
    async with ws:
        for frame in frames:
            await ws.send(frame)
        try:
            reply = await asyncio.wait_for(ws.recv(), wait)
            return f"reply {len(reply)} bytes"
        except websockets.ConnectionClosed as exc:
            return f"closed {exc.rcvd.code if exc.rcvd else ''}"
