from __future__ import annotations

import pathlib
import re

import pytest

from flame_asgi import FlamePool, LocalBackend, PayloadTooLarge, ProcessBackend, Upload
from flame_asgi._base.parent import parent, runner_mode
from flame_asgi._base.settings import MAX_PAYLOAD, SETTINGS, markdown_table, setting
from flame_asgi._observe.runner_logs import RunnerOutput

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "flame_asgi"
# Modules that still read FLAME_* variables themselves: being rewritten, they move to
# _settings (setting(name) or Setting.read) next. Remove each as it does.
NOT_YET_MOVED: set[str] = set()


def test_docs_show_exactly_the_table_of_the_settings_module() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    tables = re.findall(r"(?m)(?:^\|.*\n)+", text)
    assert tables == [markdown_table()], "regenerate the table of docs/settings.md from _settings.markdown_table()"


def test_every_variable_the_code_names_is_in_the_table() -> None:
    listed = {entry.name for entry in SETTINGS}
    named = {
        name
        for path in PACKAGE.rglob("*.py")
        for name in re.findall(r"\bFLAME_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert named - listed == set()
    assert len(listed) == len(SETTINGS)


def test_only_the_settings_module_reads_flame_variables() -> None:
    readers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"environ\b.*(FLAME_|ENV_[A-Z])", path.read_text())
    }
    assert readers - NOT_YET_MOVED == set()  # they call flame_asgi._base.settings instead


def test_settings_are_read_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAME_PARENT", raising=False)
    assert not runner_mode() and parent() is None
    monkeypatch.setenv("FLAME_PARENT", "")  # empty is unset
    assert not runner_mode()
    monkeypatch.setenv("FLAME_MAX_PAYLOAD", "1024")
    assert MAX_PAYLOAD.read() == 1024
    monkeypatch.setenv("FLAME_MAX_PAYLOAD", "2048")
    assert MAX_PAYLOAD.read() == 2048
    monkeypatch.setenv("FLAME_MAX_TRANSFER", "5")
    with pytest.raises(PayloadTooLarge, match="5-byte limit"):
        Upload(b"123456")
    monkeypatch.setenv("FLAME_RUNNER_LOG_RATE", "0.5")
    monkeypatch.setenv("FLAME_RUNNER_LOG_BURST", "3")
    output = RunnerOutput("p", "p-1")
    assert (output.rate, output.burst) == (0.5, 3)


def test_backend_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLAME_BACKEND", raising=False)
    assert isinstance(FlamePool("a").backend, LocalBackend)
    monkeypatch.setenv("FLAME_BACKEND", " Process ")
    monkeypatch.setenv("FLAME_PROCESS_APP", "shop:app")
    backend = FlamePool("b").backend
    assert isinstance(backend, ProcessBackend) and backend.app_import() == "shop:app"


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("FLAME_BACKEND", "nomad", "one of `local`, `process`, `docker`, `kubernetes`, `fly`"),
    ("FLAME_MAX_PAYLOAD", "1GB", "a positive integer"),
    ("FLAME_MAX_PAYLOAD", "0", "a positive integer"),
    ("FLAME_RUNNER_LOG_RATE", "-1", "a number, 0 or more"),
    ("FLAME_RUNNER_LOGS", "xml", "one of `json`, `text`"),
])
def test_an_invalid_value_names_the_variable_and_what_it_accepts(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str, accepts: str) -> None:
    monkeypatch.setenv(name, value)
    entry = next(entry for entry in SETTINGS if entry.name == name)
    with pytest.raises(ValueError) as info:
        entry.read()
    assert str(info.value) == f"{name}={value!r} is not valid: it must be {accepts}"


def test_invalid_backend_fails_where_the_pool_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_BACKEND", "nomad")
    with pytest.raises(ValueError, match="FLAME_BACKEND='nomad' is not valid"):
        FlamePool("c")


def test_raw_values_for_the_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAME_DOCKER_HOST_IP", "none")
    assert setting("FLAME_DOCKER_HOST_IP") == "none"
    assert setting("FLAME_K8S_PORT", {"FLAME_K8S_PORT": "9000"}) == "9000"
    assert setting("FLAME_FLY_CPUS", {}) is None
    with pytest.raises(KeyError, match="FLAME_NOT_LISTED is not in flame_asgi's settings table"):
        setting("FLAME_NOT_LISTED")
