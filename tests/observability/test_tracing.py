"""OpenTelemetry: a span in the caller, its child on the runner, one trace across processes."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from typing import Any

import httpx
import pytest

from flame_asgi import FlamePool, LocalBackend, ProcessBackend
from tests.conftest import until
from tests.observability import otel_app, work

pytestmark = pytest.mark.observability
pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402


def _hex(span: Any) -> tuple[str, str, str | None]:
    ctx = span.get_span_context()
    up = span.parent
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), format(up.span_id, "016x") if up else None


def _read(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_local_runner_work_runs_in_a_child_of_the_callers_span(spans: Any) -> None:
    tracer = trace.get_tracer("tests")
    async with FlamePool("tr", backend=LocalBackend(), max=1) as pool:
        with tracer.start_as_current_span("request"):
            assert await pool.call(work.square, 3) == 9
            pool.cast(work.square, 4)
            assert [x async for x in pool.stream(work.count, 2)] == [0, 1]
            assert await (await pool.place_child(work.square, 5)) == 25
            await until(lambda: len([s for s in spans.get_finished_spans() if s.name.startswith("flame.run")]) == 4)
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    request = by_name["request"]
    trace_id = _hex(request)[0]
    for kind, function in (("call", "square"), ("cast", "square"), ("stream", "count"), ("child", "square")):
        caller = next(s for s in finished if s.name == f"flame.{kind} {function}")
        runs = [s for s in finished if s.name == f"flame.run {function}" and s.parent is not None
                and s.parent.span_id == caller.get_span_context().span_id]
        assert len(runs) == 1, kind
        run = runs[0]
        assert _hex(caller)[0] == _hex(run)[0] == trace_id
        assert caller.parent is not None and caller.parent.span_id == request.get_span_context().span_id
        assert caller.kind == SpanKind.CLIENT and run.kind == SpanKind.SERVER
        assert caller.attributes["flame.pool"] == "tr" and caller.attributes["flame.outcome"] == "ok"
        assert caller.attributes["flame.runner_id"] == run.attributes["flame.runner_id"]
        assert run.attributes["flame.kind"] == kind


async def test_a_remote_error_marks_both_spans(spans: Any) -> None:
    async with FlamePool("err", backend=LocalBackend()) as pool:
        with pytest.raises(ValueError):
            await pool.call(work.fail)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert by_name["flame.call fail"].status.status_code == StatusCode.ERROR
    assert by_name["flame.run fail"].status.status_code == StatusCode.ERROR
    assert by_name["flame.call fail"].attributes["flame.outcome"] == "error"
    assert any(e.name == "exception" for e in by_name["flame.run fail"].events)


async def test_a_process_runner_exports_the_child_of_the_callers_span(spans: Any, tmp_path: pathlib.Path) -> None:
    span_file = tmp_path / "runner-spans.jsonl"
    backend = ProcessBackend(app="tests.observability.otel_app:app", env={"OBS_SPAN_FILE": str(span_file)},
                             heartbeat_interval=0.2, heartbeat_timeout=3.0)
    async with FlamePool("proc", backend=backend) as pool:
        inner = await pool.call(work.traced_work, 7)
        rid = pool.stats().runners[0].id
    # The pool is closed: the runner ran its lifespan's teardown (provider.shutdown()) and exited.
    caller = next(s for s in spans.get_finished_spans() if s.name == "flame.call traced_work")
    trace_id, caller_span_id, _ = _hex(caller)
    exported = {s["name"]: s for s in _read(span_file)}
    run = exported["flame.run traced_work"]
    assert run["trace_id"] == trace_id
    assert run["parent_span_id"] == caller_span_id
    assert run["kind"] == "SERVER" and run["attributes"]["flame.runner_id"] == rid
    # The work's own span, in a worker thread on the runner, nests under the runner's span.
    assert inner["trace_id"] == trace_id
    assert exported["inner work"]["parent_span_id"] == run["span_id"] and inner["span_id"] == exported[
        "inner work"]["span_id"]
    assert run["pid"] != os.getpid()  # another process exported it


async def test_a_browser_request_is_traced_through_the_runner(spans: Any, tmp_path: pathlib.Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    span_file = tmp_path / "runner-spans.jsonl"
    monkeypatch.setenv("OBS_SPAN_FILE", str(span_file))  # the runners inherit the environment
    browser_trace, browser_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    app = otel_app.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
            reply = await client.get("/square/6", headers={"traceparent": f"00-{browser_trace}-{browser_span}-01"})
        assert reply.status_code == 200 and reply.json()["square"] == "36"
    await asyncio.sleep(0)
    web = spans.get_finished_spans()
    request = next(s for s in web if s.kind == SpanKind.SERVER and "/square" in s.name)
    caller = next(s for s in web if s.name == "flame.call traced_work")
    run = next(s for s in _read(span_file) if s["name"] == "flame.run traced_work")
    assert _hex(request)[0] == _hex(caller)[0] == run["trace_id"] == browser_trace
    assert _hex(request)[2] == browser_span
    assert run["parent_span_id"] == _hex(caller)[1]
    chain = caller.parent
    while chain is not None and chain.span_id != request.get_span_context().span_id:
        chain = next(s for s in web if s.get_span_context().span_id == chain.span_id).parent
    assert chain is not None, "the flame.call span is not under the request's span"
