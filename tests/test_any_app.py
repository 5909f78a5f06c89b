"""FlameApp on a bare ASGI app: the lifespan in the right order around the app's own, an app
without a lifespan, a failing startup, and runner mode answering before the app."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.testclient import TestClient

from flame_asgi import FlameApp, FlamePool, LocalBackend, PoolClosed, add_flame_pool
from tests import remote
from tests.runner_env import become_runner

Scope = dict[str, Any]


def lifespan_app(events: list[str], pool: list[FlamePool], *, fail: str | None = None) -> Any:
    """An ASGI app with a lifespan of its own that calls its pool at startup and shutdown."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if fail:
                        await send({"type": "lifespan.startup.failed", "message": fail})
                        return
                    events.append(f"app startup, pool answers {await pool[0].call(remote.square, 3)}")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    events.append(f"app shutdown, pool answers {await pool[0].call(remote.square, 4)}")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"the app"})

    return app


def test_pools_start_before_the_apps_startup_and_close_after_its_shutdown() -> None:
    events: list[str] = []
    holder: list[FlamePool] = []
    application = FlameApp(lifespan_app(events, holder))
    holder.append(application.add_flame_pool("sq", backend=LocalBackend()))
    assert application.flame_pools == {"sq": holder[0]}
    with TestClient(application) as client:
        assert client.get("/anything").text == "the app"
        events.append("serving")
    assert events == ["app startup, pool answers 9", "serving", "app shutdown, pool answers 16"]
    assert holder[0].stats().runners == []
    with pytest.raises(PoolClosed):  # closed with the app
        asyncio.run(holder[0].call(remote.square, 1))


def test_add_flame_pool_takes_a_flame_app_too() -> None:
    application = FlameApp(lifespan_app([], []))
    pool = add_flame_pool(application, "p", backend=LocalBackend())
    assert application.flame_pools["p"] is pool
    with pytest.raises(ValueError, match="already registered"):
        application.add_flame_pool("p", backend=LocalBackend())


def test_an_app_without_a_lifespan_still_gets_its_pools(caplog: pytest.LogCaptureFixture) -> None:
    async def http_only(scope: Scope, receive: Any, send: Any) -> None:  # as Django's ASGIHandler is
        if scope["type"] != "http":
            raise ValueError(f"this app can only handle ASGI/HTTP connections, not {scope['type']}")
        pool = scope["flame_asgi.pools"]["sq"]
        body = str(await pool.call(remote.square, 5)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    application = FlameApp(http_only)
    pool = application.add_flame_pool("sq", backend=LocalBackend())
    with caplog.at_level(logging.INFO, logger="flame_asgi.app"), TestClient(application) as client:
        assert client.get("/").text == "25"
        assert pool.stats().runners  # started with the server, not with the app
    assert "does not run an ASGI lifespan (it raised ValueError" in caplog.text
    assert pool.stats().runners == []  # and stopped with it


async def test_a_failing_startup_closes_the_pools_and_tells_the_server_why() -> None:
    holder: list[FlamePool] = []
    application = FlameApp(lifespan_app([], holder, fail="no database"))
    holder.append(application.add_flame_pool("sq", backend=LocalBackend()))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # What a server sees (driven by hand: an old Starlette TestClient leaks its streams here).
    with pytest.raises(RuntimeError, match="no database"):
        await application({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": "no database"}]
    assert holder[0].stats().runners == []
    with pytest.raises(PoolClosed):
        await holder[0].call(remote.square, 1)


def test_runner_mode_answers_before_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    holder: list[FlamePool] = []
    application = FlameApp(lifespan_app(events, holder))
    holder.append(application.add_flame_pool("sq", backend=LocalBackend()))
    become_runner(monkeypatch, "p-1", "tests.test_any_app:application")
    with TestClient(application) as client:
        assert events == ["app startup, pool answers 9"]  # the app's startup ran on the runner
        assert client.get("/anything").status_code == 404  # the app never sees a request
        assert client.get("/_flame/health").json()["runner_id"] == "p-1"


def test_flame_app_refuses_what_is_not_an_asgi_app() -> None:
    with pytest.raises(TypeError, match="wraps an ASGI application"):
        FlameApp("module:app")  # type: ignore[arg-type]
