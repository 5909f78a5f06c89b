"""The floors: what one round trip costs on the transports a call rides on.

A same-process asyncio TCP echo, a bare WebSocket echo to a uvicorn process (the
transport ProcessBackend uses, one message each way, and pipelined), and an httpx POST
echo to the same process. Messages are 512 bytes, about one trivial call's frame.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from websockets.asyncio.client import connect

from bench import _uvicorn
from bench._config import Config
from bench._measure import best_rate, latency_rounds, now

MESSAGE = b"x" * 512


async def measure(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {"message_bytes": len(MESSAGE), "tcp_echo": await tcp_echo(cfg)}
    async with _uvicorn.serving("bench.apps:echo_app") as url:
        out["ws_echo"] = await ws_echo(cfg, url)
        out["httpx_post_echo"] = await httpx_echo(cfg, url)
    return out


async def tcp_echo(cfg: Config) -> dict[str, Any]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def once() -> None:
        writer.write(MESSAGE)
        await reader.readexactly(len(MESSAGE))

    try:
        return await latency_rounds(once, cfg.latency_calls, cfg.latency_warmup, cfg.rounds, cfg.latency_budget_s)
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def ws_echo(cfg: Config, url: str) -> dict[str, Any]:
    async with connect(url.replace("http", "ws", 1) + "/echo", compression=None, max_size=None,
                       ping_interval=None) as ws:
        async def once() -> None:
            await ws.send(MESSAGE)
            await ws.recv()

        result = await latency_rounds(once, cfg.latency_calls, cfg.latency_warmup, cfg.rounds, cfg.latency_budget_s)
        count = cfg.throughput_calls * 2
        rates = []
        for _ in range(cfg.rounds):
            start = now()

            async def read_all() -> None:
                for _ in range(count):
                    await ws.recv()

            reader = asyncio.ensure_future(read_all())
            for _ in range(count):
                await ws.send(MESSAGE)
            await reader
            rates.append(count / (now() - start))
        result["pipelined"] = best_rate(rates, "msgs_per_s")
        return result


async def httpx_echo(cfg: Config, url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as client:
        async def once() -> None:
            response = await client.post("/echo", content=MESSAGE)
            response.raise_for_status()

        return await latency_rounds(once, cfg.latency_calls, cfg.latency_warmup, cfg.rounds, cfg.latency_budget_s)
