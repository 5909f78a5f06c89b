"""What a runner exposes: it listens on 127.0.0.1 only, and neither the parent's secret nor
any runner's derived keys ever show up in logs (the parent's, or the runners' own at debug
level), reprs, error messages, health answers or command lines."""

from __future__ import annotations

import base64
import logging
import pathlib
import secrets
import signal

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from flame_asgi import BootError, CallTimeout, FlamePool, ProcessBackend, RunnerLost, VersionSkew
from flame_asgi._wire.keys import RunnerKeys
from tests.reliability import work
from tests.reliability.support import booted, in_flight, kill, listening_addresses, runner_pids


async def test_process_runners_listen_on_loopback_only(tmp_path: pathlib.Path) -> None:
    async with FlamePool("loopback", backend=ProcessBackend(), max=2, max_concurrency=1) as pool:
        calls = await in_flight(pool, tmp_path, 2)  # one on each runner
        pids = runner_pids(pool)
        assert len(pids) == 2
        for info in pool.stats().runners:
            assert info.url is not None
            port = int(info.url.rsplit(":", 1)[1])
            assert listening_addresses(pids[info.id]) == [("127.0.0.1", port)]
        for call in calls:
            call.cancel()


async def test_the_secret_never_appears_in_logs_reprs_or_errors(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                tmp_path: pathlib.Path) -> None:
    secret = "known-secret-" + secrets.token_hex(16)
    monkeypatch.setenv("FLAME_SECRET", secret)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    runner_ids: list[str] = []

    def record(*objects: object) -> None:
        for obj in objects:
            seen.extend((str(obj), repr(obj), *getattr(obj, "__notes__", ())))

    def grow_start(meta: dict[str, object]) -> None:
        runner_ids.append(str(meta["runner_id"]))

    # Runners log at debug level too; their stderr is relayed into the parent's log.
    backend = ProcessBackend(log_level="debug", heartbeat_interval=0.2)
    async with FlamePool("secrets", backend=backend, max_concurrency=10, on_grow_start=grow_start,
                         on_grow_end=lambda *a: record(*a), on_shrink=record) as pool:
        seen.append(await pool.call(work.describe_self))
        record(pool, backend, pool.stats())
        for runner in booted(pool):
            record(runner, runner.handle, runner.handle.spec, runner.handle.spec.info, runner.handle.spec.keys,
                   runner.conn)
            # The keys the test looks for below are the ones this runner really holds.
            assert runner.handle.spec.keys.encode() == RunnerKeys.derive(secret.encode(), runner.id).encode()
            pid = runner.handle.proc.pid
            seen.append(pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
            async with httpx.AsyncClient(trust_env=False) as client:
                seen.append((await client.get(f"{runner.handle.url}/_flame/health")).text)
            with pytest.raises(InvalidStatus) as refused:  # a second would-be parent, without a token
                await connect(runner.handle.url.replace("http", "ws") + "/_flame/ws", proxy=None)
            record(refused.value)
            with pytest.raises(InvalidStatus) as taken:  # with a valid one: the door is already taken
                await connect(runner.handle.url.replace("http", "ws") + "/_flame/ws", proxy=None,
                              additional_headers={"x-flame-auth": runner.handle.spec.upgrade_token()})
            record(taken.value)
        with pytest.raises(ValueError) as remote_error:
            await pool.call(int, "not a number")
        record(remote_error.value)
        with pytest.raises(CallTimeout) as timeout:
            await pool.call(work.touch_after, 5, str(tmp_path / "never"), timeout=0.2)
        record(timeout.value)
        (held,) = await in_flight(pool, tmp_path, 1)
        for pid in runner_pids(pool).values():
            kill(pid, signal.SIGKILL)
        with pytest.raises(RunnerLost) as lost:
            await held
        record(lost.value)
    async with FlamePool("secrets-skew", backend=ProcessBackend(env={"FLAME_CODE_VERSION": "other-build"}),
                         boot_timeout=20, on_grow_start=grow_start) as pool:
        with pytest.raises(VersionSkew) as skew:
            await pool.call(work.square, 1)
        record(skew.value)
    broken = ProcessBackend(app="tests.reliability.no_such_module:app", log_level="debug")
    with pytest.raises(BootError) as boot:
        async with FlamePool("secrets-boot", backend=broken, min=1, boot_timeout=20, on_grow_start=grow_start):
            pass
    record(boot.value)
    assert "tests.reliability.no_such_module" in str(boot.value)  # the runner's own words reach the caller
    seen.extend(r.getMessage() for r in caplog.records)
    seen.append(caplog.text)
    assert any("[secrets/" in r.getMessage() for r in caplog.records), "no runner output was captured"
    forms = {secret, base64.b64encode(secret.encode()).decode(), secret.encode().hex()}
    assert len(runner_ids) >= 3, runner_ids  # runners of all three pools
    for rid in runner_ids:  # every runner's own keys, in every form they could leak in
        keys = RunnerKeys.derive(secret.encode(), rid)
        forms.add(keys.encode())
        for key in (keys.to_runner, keys.to_parent, keys.upgrade):
            forms.update((key.hex(), base64.b64encode(key).decode().rstrip("="),
                          base64.urlsafe_b64encode(key).decode().rstrip("=")))
    leaks = [(form, text) for text in seen for form in forms if form in text]
    assert leaks == []
