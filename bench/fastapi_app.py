"""A plain FastAPI app with one route: the reference for "fresh interpreter + FastAPI +
uvicorn to first response" (what a runner booted from scratch cannot beat)."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def root() -> dict[str, bool]:
    return {"ok": True}
