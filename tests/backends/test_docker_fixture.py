"""The ``engine`` fixture of test_docker.py: a dockerd it starts is stopped when the test
session ends, one that was already running is left alone.

A real dockerd may be serving other test runs on this machine, so these sessions talk to
a stand-in: a process that answers ``/_ping`` on the socket named by ``DOCKER_HOST`` and
writes ``dockerd.pid`` where .ci/docker.sh's dockerd does, started (detached, like
dockerd) by a stand-in docker.sh that starts it unless one already answers.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("aiodocker", reason="test_docker.py needs aiodocker: pip install 'flame_asgi[docker]'")

from tests.backends.test_docker import REPO, engine_answers, running

ENGINE = '''
import os, pathlib, socket, sys
path = os.environ["DOCKER_HOST"].removeprefix("unix://")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
pathlib.Path(os.environ["FLAME_DOCKER_STATE"], "dockerd.pid").write_text(str(os.getpid()))
while True:
    conn, _ = server.accept()
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nOK")
    conn.close()
'''

DOCKER_SH = '''
set -eu
mkdir -p "$FLAME_DOCKER_STATE"
answers() { "$PYTHON" -c 'import sys; from tests.backends.test_docker import engine_answers as a; sys.exit(not a())'; }
if ! answers; then
    setsid nohup "$PYTHON" "$ENGINE" >/dev/null 2>&1 </dev/null &
    for _ in $(seq 1 100); do answers && exit 0; sleep 0.1; done
    exit 3
fi
'''

SESSION = '''
import os, pathlib, time
from tests.backends import test_docker
test_docker.DOCKER_SH = pathlib.Path(os.environ["STAND_IN_DOCKER_SH"])
from tests.backends.test_docker import engine  # noqa: F401,E402

def test_uses_the_engine(engine):
    pathlib.Path(os.environ["GATE"] + ".in").touch()
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.02)
    assert test_docker.engine_answers()
'''


@pytest.fixture
def stand_in(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """Environment for test sessions that use the stand-in engine; afterwards none runs."""
    (tmp_path / "engine.py").write_text(ENGINE)
    (tmp_path / "docker.sh").write_text(DOCKER_SH)
    (tmp_path / "test_session.py").write_text(SESSION)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    monkeypatch.setenv("FLAME_DOCKER_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("ENGINE", str(tmp_path / "engine.py"))
    monkeypatch.setenv("STAND_IN_DOCKER_SH", str(tmp_path / "docker.sh"))
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    yield tmp_path
    pidfile = tmp_path / "state" / "dockerd.pid"
    if pidfile.exists() and running(int(pidfile.read_text())):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def session(folder: pathlib.Path, gate: str) -> subprocess.Popen[str]:
    """A pytest session whose one test uses ``engine`` and waits for ``gate`` to exist."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", str(folder / "test_session.py"), "-q", "-p", "no:cacheprovider",
         "--rootdir", str(folder)],
        cwd=REPO, env={**os.environ, "GATE": str(folder / gate)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def in_test(folder: pathlib.Path, gate: str) -> None:
    deadline = time.monotonic() + 60
    while not (folder / f"{gate}.in").exists():
        assert time.monotonic() < deadline, "the session's test did not start"
        time.sleep(0.02)


def finish(run: subprocess.Popen[str], folder: pathlib.Path, gate: str) -> None:
    (folder / gate).touch()
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 0, out


def engine_pid(folder: pathlib.Path) -> int:
    return int((folder / "state" / "dockerd.pid").read_text())


def test_a_dockerd_the_session_started_is_stopped_when_the_session_ends(stand_in: pathlib.Path) -> None:
    assert not engine_answers()
    run = session(stand_in, "a")
    in_test(stand_in, "a")
    pid = engine_pid(stand_in)
    assert running(pid)
    finish(run, stand_in, "a")
    assert not running(pid) and not engine_answers()


def test_a_dockerd_that_was_already_running_is_left_alone(stand_in: pathlib.Path) -> None:
    subprocess.run(["bash", str(stand_in / "docker.sh")], check=True)
    pid = engine_pid(stand_in)
    finish(session(stand_in, "a"), stand_in, "a")
    assert running(pid) and engine_answers()


def test_the_last_of_two_overlapping_sessions_stops_the_dockerd_the_first_started(stand_in: pathlib.Path) -> None:
    first = session(stand_in, "first")
    in_test(stand_in, "first")
    pid = engine_pid(stand_in)
    second = session(stand_in, "second")
    in_test(stand_in, "second")
    finish(first, stand_in, "first")
    assert running(pid) and engine_answers()  # the second session still uses it
    finish(second, stand_in, "second")
    assert not running(pid) and not engine_answers()
