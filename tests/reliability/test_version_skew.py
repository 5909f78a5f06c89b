"""A runner built from different code than its parent is refused at once, with both
versions in the error: here the app's own package changed on disk after the parent
started (a deploy that replaced files under a running process)."""

from __future__ import annotations

import importlib
import pathlib
import secrets
import time

import pytest

from flame_asgi import FlamePool, ProcessBackend, VersionSkew
from tests.reliability import work


def _make_package(root: pathlib.Path) -> str:
    name = f"skewapp_{secrets.token_hex(4)}"
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text("from flame_asgi import FastAPI\n\napp = FastAPI()\n")
    (pkg / "helpers.py").write_text("RATE = 1\n")
    return name


async def test_a_runner_started_from_files_deployed_after_the_parent_loaded_its_code_is_refused(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fingerprint of the source is the code version here (no FLAME_CODE_VERSION).
    monkeypatch.delenv("FLAME_CODE_VERSION", raising=False)
    name = _make_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(f"{name}.main")
    app = f"{name}.main:app"
    # The parent fixes its code version when its first pool starts; runners match it.
    async with FlamePool("skew-before", backend=ProcessBackend(app=app), boot_timeout=20) as pool:
        assert await pool.call(work.square, 3) == 9
    # A deploy rewrites a module on disk (one the app does not even import) under the
    # running parent: runners started from now on run other code than the parent.
    (tmp_path / name / "helpers.py").write_text("RATE = 2\n")
    async with FlamePool("skew-after", backend=ProcessBackend(app=app), boot_timeout=20) as pool:
        started = time.monotonic()
        with pytest.raises(VersionSkew) as raised:
            await pool.call(work.square, 4)
        assert time.monotonic() - started < 10  # refused at the handshake, not retried until a deadline
        message = str(raised.value)
        assert "version skew: the runner runs code version" in message
        assert "but its parent runs" in message and "deploy the same code" in message
        runner_version, parent_version = message.split("code version ")[1].split(" but its parent runs ")
        assert runner_version.strip() != parent_version.split(";")[0].strip()
        assert pool.stats().runners == [] and pool.stats().booting == 0  # the refused runner was stopped
