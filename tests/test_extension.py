"""add_flame_pool on any Starlette-based app: hooks, lifespans, mounts, runner mode.

The first two tests serve real apps with uvicorn and a ProcessBackend pool: a plain
Starlette app and a plain fastapi.FastAPI app whose tables come from a startup hook.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import fastapi
import httpx
import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from websockets.sync.client import connect

from flame_asgi import FastAPI, FlamePool, LocalBackend, PoolClosed, add_flame_pool, flame_pool
from tests import remote
from tests.runner_env import become_runner
from tests.servers import serve


# -- real servers ----------------------------------------------------------------------
def test_plain_starlette_app_is_its_own_runner_under_uvicorn() -> None:
    with serve("tests.apps.starlette_app:app") as (url, _proc, watched):
        got = httpx.get(url + "/work", headers={"host": "localhost"}, timeout=30).json()
        watched.add(got["pid"])
        assert got["pid"] != got["web_pid"]  # it ran on a runner process
        assert got["runner"].startswith("work-")
        # The app's own lifespan ran in the web process and, separately, on the runner.
        assert got["web_hooks"] == [f"lifespan ran in {got['web_pid']}"]
        assert got["hooks"] == [f"lifespan ran in {got['pid']}"]
        assert got["stats_pid"] == got["web_pid"]
        # The runner's own copy of the pool started nothing: no fork server, no process.
        assert got["children"] == []
        # The app's middleware still guards its web routes (runners bypass it: 127.0.0.1
        # is not an allowed host, yet the parent reached its runner).
        assert httpx.get(url + "/work", timeout=30).status_code == 400


@pytest.fixture
def hooks_db(tmp_path: pathlib.Path) -> Iterator[dict[str, str]]:
    yield {"HOOKS_DB": str(tmp_path / "hooks.sqlite")}


def test_plain_fastapi_app_with_on_event_startup_under_uvicorn(hooks_db: dict[str, str]) -> None:
    with serve("tests.apps.fastapi_hooks_app:app", env=hooks_db) as (url, _proc, watched):
        response = httpx.get(url + "/square/7", timeout=30)
        assert response.status_code == 200, response.text  # the dependency is no query parameter
        got = response.json()
        watched.add(got["pid"])
        assert got["square"] == 49 and got["pid"] != got["web_pid"] and got["stats_pid"] == got["web_pid"]
        assert got["startup_ran_here"] is True  # the startup hook made the table on the runner too

        # flame_runner: both calls of one request run on one runner, which keeps its memory.
        model = httpx.get(url + "/model/m1", timeout=30).json()
        assert model["loaded_in"] == model["used_in"] and model["runner"].startswith("sq-")
        with connect(url.replace("http", "ws") + "/ws/model/m2", open_timeout=30) as ws:
            loaded = json.loads(ws.recv(timeout=30))["loaded_in"]
            for step in ("a", "b"):
                ws.send(step)
                assert json.loads(ws.recv(timeout=30)) == {"step": step, "used_in": loaded}
            ws.send("bye")


# -- hooks and lifespans of every form ---------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # on_event/on_startup are deprecated by FastAPI
def test_startup_and_shutdown_hooks_run_with_pools_around_them() -> None:
    events: list[str] = []

    async def on_start() -> None:
        events.append(f"on_startup, pool answers {await app.flame_pools['sq'].call(remote.square, 3)}")

    app = FastAPI(on_startup=[on_start], on_shutdown=[lambda: events.append("on_shutdown")])
    app.add_flame_pool("sq", backend=LocalBackend())

    @app.on_event("startup")
    def decorated() -> None:
        events.append("on_event startup")

    @app.on_event("shutdown")
    async def decorated_stop() -> None:
        events.append(f"on_event shutdown, pool answers {await app.flame_pools['sq'].call(remote.square, 4)}")

    with TestClient(app):
        assert events == ["on_startup, pool answers 9", "on_event startup"]
    assert events[2:] == ["on_shutdown", "on_event shutdown, pool answers 16"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("form", ["sync generator", "async generator", "context manager", "state"])
def test_every_lifespan_form_fastapi_accepts(form: str) -> None:
    events: list[str] = []

    def sync_gen(app: Any) -> Iterator[None]:
        events.append("start")
        yield
        events.append("stop")

    async def async_gen(app: Any) -> AsyncIterator[None]:
        events.append("start")
        yield
        events.append("stop")

    @asynccontextmanager
    async def with_state(app: Any) -> AsyncIterator[dict[str, str]]:
        events.append("start")
        yield {"db": "open"}
        events.append("stop")

    lifespan = {"sync generator": sync_gen, "async generator": async_gen, "context manager": asynccontextmanager(
        async_gen), "state": with_state}[form]
    app = FastAPI(lifespan=lifespan)
    app.add_flame_pool("sq", backend=LocalBackend())

    @app.get("/")
    async def root(request: Request, pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> dict[str, Any]:
        return {"sq": await pool.call(remote.square, 5), "db": getattr(request.state, "db", None)}

    with TestClient(app) as client:
        assert client.get("/").json() == {"sq": 25, "db": "open" if form == "state" else None}
    assert events == ["start", "stop"]


def test_plain_starlette_endpoint_uses_flame_pool_on_request() -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(await flame_pool("sq")(request).call(remote.square, 6)))

    app = Starlette(routes=[Route("/", endpoint)])
    add_flame_pool(app, "sq", backend=LocalBackend())
    with TestClient(app) as client:
        assert client.get("/").text == "36"


def test_router_lifespans_merged_after_add_flame_pool_still_run() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def router_lifespan(app: Any) -> AsyncIterator[None]:
        events.append("router start")
        yield
        events.append("router stop")

    app = fastapi.FastAPI()
    add_flame_pool(app, "sq", backend=LocalBackend())
    router = fastapi.APIRouter(lifespan=router_lifespan)

    @router.get("/r")
    async def r(pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> int:
        return await pool.call(remote.square, 7)

    app.include_router(router)
    with TestClient(app) as client:
        assert client.get("/r").json() == 49
    assert events == ["router start", "router stop"]


# -- mounted sub-apps and replaced lifespans -------------------------------------------------
def test_mounted_sub_app_pools_start_on_first_use(caplog: pytest.LogCaptureFixture) -> None:
    inner = FastAPI()
    pool = inner.add_flame_pool("sq", backend=LocalBackend())

    @inner.get("/sq/{x}")
    async def sq(x: int, pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> int:
        return await pool.call(remote.square, x)

    outer = Starlette(routes=[Mount("/inner", app=inner)])
    with caplog.at_level(logging.WARNING, "flame_asgi.pool"), TestClient(outer) as client:
        assert client.get("/inner/sq/8").json() == 64
        assert client.get("/inner/sq/9").json() == 81
    warnings = [r.getMessage() for r in caplog.records if "started on first use" in r.getMessage()]
    assert len(warnings) == 1 and "mounted sub-app" in warnings[0]
    assert pool.stats().runners  # it keeps running: its app's lifespan will never stop it


async def test_sub_app_routes_find_the_outer_apps_pools() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(await flame_pool("sq")(request).call(remote.square, 4))

    outer = Starlette(routes=[Mount("/sub", app=Starlette(routes=[Route("/", endpoint)]))])
    add_flame_pool(outer, "sq", backend=LocalBackend())
    with TestClient(outer) as client:
        assert client.get("/sub/").json() == 16


async def test_replaced_lifespan_context_starts_pools_on_first_use() -> None:
    app = fastapi.FastAPI()
    pool = add_flame_pool(app, "sq", backend=LocalBackend())

    @asynccontextmanager
    async def replaced(app: Any) -> AsyncIterator[None]:
        yield

    app.router.lifespan_context = replaced
    with TestClient(app):
        assert await pool.call(remote.square, 2) == 4
    await pool.aclose()
    with pytest.raises(PoolClosed):  # closed stays closed
        await pool.call(remote.square, 2)


def test_a_pool_used_from_another_event_loop_says_why_it_cannot_answer() -> None:
    app = FastAPI()
    app.add_flame_pool("sq", backend=LocalBackend())

    @app.get("/sq/{x}")
    async def sq(x: int, pool: Annotated[FlamePool, Depends(flame_pool("sq"))]) -> int:
        return await pool.call(remote.square, x)

    client = TestClient(app)  # no `with`: no lifespan, and each request runs in a loop of its own
    assert client.get("/sq/3").json() == 9  # started on first use, in the first request's loop
    with pytest.raises(PoolClosed, match=r"started in another event loop, which has closed.*with TestClient"):
        client.get("/sq/4")


async def test_a_pool_on_no_app_is_not_started_on_use() -> None:
    with pytest.raises(PoolClosed, match="not started"):
        await FlamePool("alone", backend=LocalBackend()).call(remote.square, 2)


# -- runner mode on any app --------------------------------------------------------------
def _runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    become_runner(monkeypatch, "p-1", "tests.test_extension:app")


def test_runner_mode_on_plain_starlette_is_outside_all_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("lifespan")
        yield

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("web"))], lifespan=lifespan)
    add_flame_pool(app, "p", backend=LocalBackend())
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["only.example"])  # added later: still inside
    assert TestClient(app, base_url="http://only.example").get("/").text == "web"
    _runner_env(monkeypatch)
    with TestClient(app) as client:
        assert events == ["lifespan"]  # the app's lifespan runs on runners too
        assert client.get("/").status_code == 404
        assert client.get("/_flame/health").json()["runner_id"] == "p-1"


def test_add_flame_pool_refuses_what_it_cannot_serve() -> None:
    async def bare_asgi(scope: Any, receive: Any, send: Any) -> None: ...

    with pytest.raises(TypeError, match="needs a Starlette-based app"):
        add_flame_pool(bare_asgi, "p")
    app = Starlette()
    with TestClient(app):
        pass
    with pytest.raises(RuntimeError, match="after the app started serving"):
        add_flame_pool(app, "p")
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        add_flame_pool(Starlette(), "")


def test_flame_asgi_fastapi_is_a_fastapi() -> None:
    app = FastAPI(title="t", version="9")

    @app.get("/items/{i}")
    async def item(i: int) -> dict[str, int]:
        return {"i": i}

    plain = fastapi.FastAPI(title="t", version="9")
    plain.get("/items/{i}")(item)
    assert isinstance(app, fastapi.FastAPI)
    assert app.openapi() == plain.openapi()
    with TestClient(app) as client:
        assert client.get("/items/3").json() == {"i": 3}
        assert client.get("/items/x").status_code == 422
