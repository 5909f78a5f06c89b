"""The code samples of the docs, run as a reader would: each ``# file: NAME.py`` block is
written to a fresh folder, then served by a real server, run with ``python``, or tested by
a real ``pytest`` in a subprocess; the deploy pages' manifests are parsed and checked
against the settings module and the RBAC manifest; the errors the troubleshooting page
quotes are raised for real and compared with it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import tomllib
from typing import Any

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from flame_asgi import CallTimeout, FlamePool, LocalBackend, PayloadTooLarge, PoolClosed, SerializationError
from flame_asgi._base.settings import SETTINGS
from tests.servers import serve

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
# Subprocesses import flame_asgi from this checkout whatever is installed, and start from a
# clean slate: no FLAME_* variable of the test run changes what a page's example does.
CLEAN_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("FLAME_")},
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
PROCESS = {"FLAME_BACKEND": "process", "PYTHONPATH": CLEAN_ENV["PYTHONPATH"]}


def write_files(page: str, folder: pathlib.Path) -> list[str]:
    text = (DOCS / page).read_text()
    names = []
    for block in re.findall(r"```python\n(# file: (\S+)\n.*?)```", text, re.S):
        body, name = block
        (folder / name).write_text(body)
        names.append(name)
    return names


def test_existing_app_page(tmp_path: pathlib.Path) -> None:
    assert write_files("existing-app.md", tmp_path) == ["shop.py", "gallery.py", "test_gallery.py"]
    env = {**PROCESS, "SHOP_DB": str(tmp_path / "shop.sqlite")}
    with serve("shop:app", env=env, cwd=str(tmp_path), probe="/docs") as (url, _proc, watched):
        got = httpx.get(url + "/revenue", timeout=30).json()
        watched.add(got["computed_in"])
        assert got["revenue"] == 42.5 and got["computed_in"] != got["web"]
    with serve("gallery:app", env=PROCESS, cwd=str(tmp_path), probe="/") as (url, _proc, watched):
        got = httpx.get(url + "/thumbnail/320", timeout=30).json()
        watched.add(got["resized_in"])
        assert got["width"] == 320
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gallery.py"],
                         cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_leases_page(tmp_path: pathlib.Path) -> None:
    assert write_files("leases.md", tmp_path) == ["tagger.py"]
    with serve("tagger:app", env=PROCESS, cwd=str(tmp_path), probe="/docs") as (url, _proc, watched):
        tagged = httpx.post(url + "/tag", json=["a b", "c"], timeout=30).json()
        assert [t["tags"] for t in tagged] == [["a", "b"], ["c"]]
        assert {t["model"] for t in tagged} == {"weights of small"} and len({t["pid"] for t in tagged}) == 1
        watched.add(tagged[0]["pid"])
        with connect(url.replace("http", "ws") + "/live", open_timeout=30) as ws:
            ws.send("x y")
            assert json.loads(ws.recv(timeout=30))["tags"] == ["x", "y"]


@pytest.mark.parametrize("server", ["gunicorn"])
def test_servers_page(tmp_path: pathlib.Path, server: str) -> None:
    assert write_files("servers.md", tmp_path) == ["work.py"]
    with serve("work:app", server=server, workers=2, env={"PYTHONPATH": CLEAN_ENV["PYTHONPATH"]}, cwd=str(tmp_path),
               probe="/docs") as (url, _proc, watched):
        got = httpx.get(url + "/where", timeout=30).json()
        watched.add(got["runner"])
        assert got["runner"] != got["worker"]


def test_getting_started_page(tmp_path: pathlib.Path) -> None:
    assert write_files("getting-started.md", tmp_path) == ["fib_demo.py"]
    run = subprocess.run([sys.executable, "fib_demo.py"], cwd=tmp_path, env=CLEAN_ENV,
                         capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["75025", "[0, 1, 2]"]


def test_transfers_page(tmp_path: pathlib.Path) -> None:
    assert write_files("transfers.md", tmp_path) == ["transfer_demo.py"]
    run = subprocess.run([sys.executable, "transfer_demo.py"], cwd=tmp_path, env=CLEAN_ENV,
                         capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [hashlib.sha256(b"x" * 50_000_000).hexdigest(), "10000000"]
    assert (tmp_path / "copy.bin").read_bytes() == b"frame" * 2_000_000


def test_testing_page(tmp_path: pathlib.Path) -> None:
    """The guide's tests pass under a real pytest: LocalBackend with TestClient, and
    ProcessBackend runner processes in async tests."""
    assert write_files("testing.md", tmp_path) == ["app.py", "conftest.py", "test_app.py", "test_runners.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "asyncio"],
                         cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout + run.stderr
    passed = set(re.findall(r"::(test_\w+) PASSED", run.stdout))
    assert passed == {
        "test_area_runs_on_a_runner_and_reports_progress", "test_a_lost_runner_is_a_503",
        "test_a_call_from_the_test_itself", "test_area_on_a_runner_process",
        "test_a_runner_that_dies_fails_its_call_and_is_replaced",
    }, run.stdout


# -- the deploy walkthroughs: manifests parse, and name what exists -----------------------
def blocks(page: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (DOCS / page).read_text(), re.S)


def flame_variables(env: dict[str, Any] | list[dict[str, Any]]) -> set[str]:
    names = env.keys() if isinstance(env, dict) else [e["name"] for e in env]
    return {n for n in names if n.startswith("FLAME_")}


KNOWN = {s.name for s in SETTINGS}


def test_fly_page_fly_toml() -> None:
    (text,) = [b for b in blocks("deploy/fly.md", "toml") if b.startswith("# fly.toml")]
    config = tomllib.loads(text)
    assert config["env"]["FLAME_BACKEND"] == "fly"
    assert flame_variables(config["env"]) <= KNOWN
    assert int(config["env"]["PORT"]) == config["http_service"]["internal_port"]
    # The repository's image serves on $PORT: the one it builds is the one the page deploys.
    assert "${PORT:-8000}" in (ROOT / "Dockerfile").read_text()


def test_kubernetes_page_manifests() -> None:
    rbac = list(yaml.safe_load_all((DOCS / "kubernetes-rbac.yaml").read_text()))
    (account,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    docs: dict[str, list[Any]] = {}
    for text in blocks("deploy/kubernetes.md", "yaml"):
        if text.startswith("--8<--"):  # the RBAC file itself, included when the site is built
            assert text.strip() == '--8<-- "kubernetes-rbac.yaml"'
            continue
        first = text.splitlines()[0]
        docs[first] = list(yaml.safe_load_all(text))
    (deployment,) = docs["# deployment.yaml"]
    pod = deployment["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == account
    (web,) = pod["spec"]["containers"]
    assert flame_variables(web["env"]) <= KNOWN and {"FLAME_BACKEND", "FLAME_K8S_CPU"} <= flame_variables(web["env"])
    assert {e["name"] for e in web["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    (service,) = docs["# service.yaml"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == web["ports"][0]["containerPort"]
    (config_map,) = docs["# runner-template.yaml"]
    template = yaml.safe_load(config_map["data"]["runner-pod.yaml"])
    assert template["spec"]["containers"][0]["resources"]["limits"]
    (additions,) = docs["# deployment.yaml (additions)"]
    pod_additions = additions["spec"]["template"]["spec"]
    (mount,) = pod_additions["containers"][0]["volumeMounts"]
    (volume,) = pod_additions["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and volume["name"] == mount["name"]
    (variable,) = pod_additions["containers"][0]["env"]
    assert variable["name"] in KNOWN
    assert variable["value"] == f"{mount['mountPath']}/{next(iter(config_map['data']))}"


def test_docker_compose_page_files() -> None:
    simple, docker = [yaml.safe_load(b) for b in blocks("deploy/docker-compose.md", "yaml")]
    assert simple["services"]["web"]["build"] == "."
    web = docker["services"]["web"]
    env = web["environment"]
    assert flame_variables(env) <= KNOWN and env["FLAME_BACKEND"] == "docker"
    assert env["FLAME_DOCKER_NETWORK"] == docker["networks"]["flame"]["name"]
    assert "flame" in web["networks"] and "flame" in docker["services"]["db"]["networks"]
    binds = env["FLAME_DOCKER_BINDS"]
    assert binds in web["volumes"]  # runners and the web container mount the same host folder
    assert "/var/run/docker.sock:/var/run/docker.sock" in web["volumes"]
    db = docker["services"]["db"]["environment"]
    user, password, host = re.match(r"postgresql://(\w+):(\w+)@(\w+):5432/", env["DATABASE_URL"]).groups()
    assert (user, password, host) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], "db")


# -- the troubleshooting page quotes the messages users really get -----------------------
def page_text(page: str) -> str:
    return " ".join((DOCS / page).read_text().split())


def quoted(fragment: str, error: BaseException) -> None:
    """``fragment`` is both in the real message and (modulo line wrapping) on the page."""
    assert fragment in str(error), f"{fragment!r} is no longer in the real message: {error}"
    assert fragment in page_text("troubleshooting.md"), f"troubleshooting.md no longer quotes {fragment!r}"


async def slow() -> None:
    await asyncio.sleep(10)


async def test_troubleshooting_page_quotes_the_real_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = FlamePool("reports", backend=LocalBackend())
    with pytest.raises(PoolClosed) as closed:
        await pool.call(abs, 1)
    quoted("pool 'reports' is not started: use `async with pool`, or register it with add_flame_pool(app, ...) "
           "and run the app's lifespan", closed.value)

    lock = threading.Lock()

    def work() -> bool:
        return lock.locked()

    work.__qualname__ = "work"  # as the page's reader would have it: not nested in a test

    monkeypatch.setenv("FLAME_MAX_PAYLOAD", "1000")
    async with FlamePool("geometry", backend=LocalBackend(), max=1, max_concurrency=1) as pool:
        with pytest.raises(SerializationError) as unpicklable:
            await pool.call(work)
        quoted("cannot send the call to work(): closure variable 'lock' of work()", unpicklable.value)
        quoted("cannot be pickled: cannot pickle '_thread.lock' object. Create it inside the function on the "
               "runner, or pass the plain data needed to rebuild it.", unpicklable.value)
        with pytest.raises(PayloadTooLarge) as too_large:
            await pool.call(len, b"x" * 5000)
        quoted("-byte limit (FLAME_MAX_PAYLOAD); send a path, or wrap the data in flame_asgi.Upload to stream it",
               too_large.value)
        with pytest.raises(CallTimeout) as overran:
            await pool.call(slow, timeout=0.2)
        quoted("did not finish within", overran.value)
        quoted("s; it was cancelled on the runner", overran.value)
        blocker = asyncio.create_task(pool.call(slow, timeout=10))
        while not pool.stats().runners or not pool.stats().runners[0].active:
            await asyncio.sleep(0.01)
        with pytest.raises(CallTimeout) as no_slot:
            await pool.call(abs, 1, timeout=0.2)
        quoted("no free runner slot within", no_slot.value)
        quoted("raise the timeout, max or max_concurrency", no_slot.value)
        blocker.cancel()

        def in_another_loop() -> BaseException:
            async def call() -> None:
                await pool.call(abs, 1)

            try:
                asyncio.run(call())
            except PoolClosed as exc:
                return exc
            raise AssertionError("a call from another event loop was not refused")

        other_loop = await asyncio.to_thread(in_another_loop)
        quoted("was started in another event loop", other_loop)
        quoted("a pool serves the loop it started in. With Starlette's TestClient, use `with TestClient(app) as "
               "client:` so the app's lifespan starts its pools in the loop that serves the requests.", other_loop)


@pytest.mark.parametrize(("page", "name", "expected"), [
    ("pools.md", "map_demo.py", ["[5, 4, 3]", "16", "2 ValueError", "5"]),
    ("pools.md", "track_demo.py", ["runners kept: 1", "frame bytes: 1000000", "scratch removed: True"]),
    ("pools.md", "warm_demo.py", ["5 runners up before the burst; it ran on 5 of them"]),
    ("progress.md", "steer_demo.py", ["3 frame 3 at quality 5", "stopped after a few frames"]),
])
def test_parity_examples(tmp_path: pathlib.Path, page: str, name: str, expected: list[str]) -> None:
    assert name in write_files(page, tmp_path)
    run = subprocess.run([sys.executable, name], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True,
                         timeout=100)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == expected
