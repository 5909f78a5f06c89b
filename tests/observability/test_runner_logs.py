"""A runner's log records, stdout and stderr in the parent's logging: tagged, and bounded."""

from __future__ import annotations

import asyncio
import collections
import logging

import pytest

from flame_asgi import BootError, FlamePool, LocalBackend, ParentInfo, ProcessBackend
from flame_asgi._observe.runner_logs import (
    JsonLineHandler,
    RunnerOutput,
    encode_record,
    forward_runner_logs,
    relay_lines,
)
from tests.conftest import until
from tests.observability import work

pytestmark = pytest.mark.observability


def process_backend() -> ProcessBackend:
    return ProcessBackend(heartbeat_interval=0.2, heartbeat_timeout=3.0)


def _from(caplog: pytest.LogCaptureFixture, name: str, runner: str | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name and (runner is None or getattr(r, "flame_runner", 0) == runner)]


async def test_runner_log_records_arrive_as_records_tagged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with FlamePool("logs", backend=process_backend()) as pool:
        rid = await pool.call(work.log_things, "there")
        await until(lambda: len(_from(caplog, "obs.remote", rid)) == 2, what="the runner's two records")
    hello, failed = _from(caplog, "obs.remote", rid)
    assert hello.levelno == logging.WARNING and hello.flame_pool == "logs"  # type: ignore[attr-defined]
    assert hello.getMessage().startswith(f"[logs/{rid}] hello there from ")
    assert hello.job == 7 and hello.label == "thumbs"  # type: ignore[attr-defined]  # the record's extra
    assert hello.funcName == "log_things" and hello.pathname.endswith("work.py")
    assert failed.levelno == logging.ERROR and "ZeroDivisionError" in (failed.exc_text or "")
    assert not _from(caplog, "obs.remote.quiet")  # the runner's own levels still apply
    # Nothing arrived as a raw JSON line.
    assert not any('{"flame_log"' in r.getMessage() for r in caplog.records)


async def test_parent_levels_filter_forwarded_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("obs.remote").setLevel(logging.ERROR)
    try:
        async with FlamePool("filtered", backend=process_backend()) as pool:
            rid = await pool.call(work.log_things, "x")
            await until(lambda: _from(caplog, "obs.remote", rid), what="the error record")
            await asyncio.sleep(0.2)
    finally:
        logging.getLogger("obs.remote").setLevel(logging.NOTSET)
    assert [r.levelno for r in _from(caplog, "obs.remote", rid)] == [logging.ERROR]


async def test_stdout_and_stderr_lines_are_tagged(caplog: pytest.LogCaptureFixture) -> None:
    async with FlamePool("out", backend=process_backend()) as pool:
        rid = await pool.call(work.print_things, "abc")
        await until(lambda: len(_from(caplog, "flame_asgi.runner", rid)) >= 2, what="stdout and stderr lines")
    lines = {r.getMessage(): r for r in _from(caplog, "flame_asgi.runner", rid)}
    assert f"[out/{rid}] printed abc" in lines and f"[out/{rid}] stderr abc" in lines
    assert lines[f"[out/{rid}] printed abc"].flame_pool == "out"  # type: ignore[attr-defined]


async def test_a_chatty_runner_is_rate_limited_with_a_count(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_RUNNER_LOG_RATE", "20")
    monkeypatch.setenv("FLAME_RUNNER_LOG_BURST", "50")
    async with FlamePool("chatty", backend=process_backend()) as pool:
        assert await asyncio.wait_for(pool.call(work.chatter, 5000), 10) == 5000  # never blocked on its pipe
        rid = pool.stats().runners[0].id
        assert await pool.call(work.square, 3) == 9
    # The pool is closed: the rest of the count has been reported.
    records = _from(caplog, "flame_asgi.runner", rid)
    kept = [r for r in records if "chatter line" in r.getMessage()]
    dropped = sum(getattr(r, "flame_dropped", 0) for r in records)
    assert 50 <= len(kept) < 500
    assert len(kept) + dropped == 5000
    assert any("dropped: over 20 lines/s (FLAME_RUNNER_LOG_RATE)" in r.getMessage() for r in records)


async def test_an_overlong_line_is_cut_and_the_pipe_keeps_flowing(caplog: pytest.LogCaptureFixture) -> None:
    async with FlamePool("long", backend=process_backend()) as pool:
        rid = await pool.call(work.long_line, 300_000)
        await until(lambda: any("after the long line" in r.getMessage()
                                for r in _from(caplog, "flame_asgi.runner", rid)), what="the next line")
        assert await pool.call(work.long_line, 200_000) == rid  # the same runner still answers
    messages = [r.getMessage() for r in _from(caplog, "flame_asgi.runner", rid)]
    lengths = [len(m) for m in messages if m.endswith("[... line cut]")]
    assert len(lengths) == 2, lengths
    assert max(lengths) < 40_000, lengths


async def test_local_runners_log_straight_into_the_parent(caplog: pytest.LogCaptureFixture) -> None:
    before = logging.lastResort
    async with FlamePool("local", backend=LocalBackend()) as pool:
        rid = await pool.call(work.log_things, "local")
    # Same process: the records are the parent's own, with nothing in between.
    assert _from(caplog, "obs.remote")[0].getMessage().startswith("hello local")
    assert rid is not None and logging.lastResort is before
    forward_runner_logs(ParentInfo(pool="p", runner_id="r", parent_address="h:1", backend="local",
                                   code_version="v", app="m:app"))
    assert logging.lastResort is before


def test_the_json_line_round_trip(caplog: pytest.LogCaptureFixture) -> None:
    record = logging.LogRecord("app.part", logging.WARNING, "/src/app.py", 12, "n=%d", (5,), None, func="f")
    record.user = "ada"
    line = encode_record(record)
    assert "\n" not in line and line.startswith('{"flame_log":')
    output = RunnerOutput("p", "p-1", rate=1000, burst=10)
    assert output.line(line) == "WARNING:app.part:n=5"  # what the tail (and a BootError) shows
    assert output.line('{"flame_log": not json') == '{"flame_log": not json'
    assert output.line("plain text") == "plain text"
    rebuilt, broken, plain = caplog.records
    assert rebuilt.name == "app.part" and rebuilt.getMessage() == "[p/p-1] n=5" and rebuilt.lineno == 12
    assert rebuilt.user == "ada" and rebuilt.flame_runner == "p-1"  # type: ignore[attr-defined]
    assert broken.name == plain.name == "flame_asgi.runner"
    assert plain.getMessage() == "[p/p-1] plain text" and plain.flame_pool == "p"  # type: ignore[attr-defined]
    assert isinstance(JsonLineHandler(), logging.Handler)


def test_the_bucket_drops_then_reports(caplog: pytest.LogCaptureFixture) -> None:
    output = RunnerOutput("p", "p-1", rate=0.0001, burst=3)
    for i in range(10):
        output.line(f"line {i}")
    assert output.dropped == 7
    output.close()
    assert [r.getMessage() for r in caplog.records] == [
        "[p/p-1] line 0", "[p/p-1] line 1", "[p/p-1] line 2",
        "[p/p-1] 7 line(s) of runner output dropped: over 0.0001 lines/s (FLAME_RUNNER_LOG_RATE)"]
    assert caplog.records[-1].flame_dropped == 7  # type: ignore[attr-defined]


async def test_relay_lines_keeps_the_tail_and_ends_with_the_stream() -> None:
    stream = asyncio.StreamReader(limit=64)
    stream.feed_data(b"one\n" + b"y" * 200 + b"\ntwo\nlast")
    stream.feed_eof()
    tail: collections.deque[str] = collections.deque(maxlen=10)
    await relay_lines(stream, RunnerOutput("p", "p-1"), tail)
    assert [t[:12] for t in tail] == ["one", "y" * 12, "two", "last"]
    assert tail[1].endswith("[... line cut]")


async def test_a_runner_that_fails_to_boot_shows_its_records_readably(caplog: pytest.LogCaptureFixture) -> None:
    backend = ProcessBackend(app="tests.observability.failing_app:app")
    async with FlamePool("boot", backend=backend, boot_timeout=20) as pool:
        with pytest.raises(BootError) as raised:
            await pool.call(work.square, 1, timeout=2)
    assert "WARNING:obs.boot:cannot open the database at db:5432" in str(raised.value)
    records = _from(caplog, "obs.boot")
    assert records and records[0].getMessage().endswith("cannot open the database at db:5432")
    assert records[0].flame_pool == "boot"  # type: ignore[attr-defined]
