"""Make this test process look like a runner booted by a backend (runner mode in-process)."""

from __future__ import annotations

import pytest

from flame_asgi import ParentInfo
from flame_asgi._wire.keys import RunnerKeys

ROOT = b"s" * 32  # the parent's root secret, as these tests pretend it


def become_runner(monkeypatch: pytest.MonkeyPatch, runner_id: str = "p-1", app: str = "tests.app:app") -> RunnerKeys:
    """Set FLAME_PARENT and the runner's own keys, as a backend would; return the keys."""
    info = ParentInfo(pool="p", runner_id=runner_id, parent_address="test:1", backend="process",
                      code_version="v", app=app)
    keys = RunnerKeys.derive(ROOT, runner_id)
    monkeypatch.setenv("FLAME_PARENT", info.encode())
    monkeypatch.setenv("FLAME_RUNNER_KEYS", keys.encode())
    return keys
