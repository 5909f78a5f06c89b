"""DockerBackend: a cold call beside ``docker run`` of the same image, and 100 MB over its network.

- ``docker_run_first_response`` (the floor): create and start a container from the same
  image, with the same mounts, published port and Engine calls DockerBackend makes, serving
  a plain FastAPI app (``bench.fastapi_app``) under uvicorn; time to its first HTTP 200.
- ``cold_call``: a running pool with ``min=0`` and a DockerBackend; a call arrives and
  its runner container is created, started, connected to and handed the call: time to
  the result. Each round uses a fresh pool. The ratio to the floor is reported.
- ``payload_100mb``: a 100 MB ``bytes`` argument echoed back by a booted Docker runner,
  through the published port (docker-proxy, the bridge network): MB/s = size / round trip.

The image is ``local/empty:1`` (``FLAME_DOCKER_TEST_IMAGE``), the empty image the test
suite uses: this machine's ``/usr``, Python and the repository are mounted read-only, so
no registry is needed. ``bash .ci/docker.sh`` starts an Engine and creates the image;
without them, the measurements are recorded as unavailable, with the reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pathlib
import sys
from typing import Any

import httpx

from bench import tasks
from bench._config import Config
from bench._measure import best_time, now, ratio, unavailable
from bench.payload import echo_rates
from flame_asgi import FlamePool

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("FLAME_DOCKER_TEST_IMAGE", "local/empty:1")
PORT = 8000
SETUP = "bash .ci/docker.sh (starts a Docker Engine and creates the image)"


async def measure(cfg: Config) -> dict[str, Any]:
    missing = await _engine_missing()
    if missing is not None:
        return unavailable(missing)
    floor = best_time([await _docker_run_first_response() for _ in range(cfg.cold_rounds)])
    cold = best_time([await _cold_call() for _ in range(cfg.cold_rounds)])
    payload = await _payload(100, cfg.payload_rounds[-1])
    return {"available": True, "image": IMAGE, "docker_run_first_response": floor, "cold_call": cold,
            "payload_100MB": payload,
            "ratios": {"cold_call_over_docker_run": ratio(cold["best_ms"], floor["best_ms"])}}


async def _engine_missing() -> str | None:
    """Why the Docker measurements cannot run here, or None."""
    if importlib.util.find_spec("aiodocker") is None:
        return "aiodocker is not installed (pip install 'flame_asgi[docker]')"
    import aiodocker

    try:
        async with aiodocker.Docker() as docker:
            await docker.version()
            try:
                await docker.images.inspect(IMAGE)
            except aiodocker.DockerError:
                return f"image {IMAGE} is missing: {SETUP}"
    except Exception as exc:
        return f"no Docker Engine answers ({type(exc).__name__}: {exc}): {SETUP}"
    return None


def _binds() -> list[str]:
    """This machine's system, Python and the repository, read-only (the image is empty)."""
    dirs = ["/usr", "/lib", "/lib64", "/bin", "/etc", sys.base_prefix, sys.prefix, str(REPO)]
    unique = [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]
    return [f"{d}:{d}:ro" for d in unique if not any(d.startswith(o + "/") for o in unique)]


def _backend(**options: Any) -> Any:
    from flame_asgi.backends.docker import DockerBackend

    return DockerBackend(IMAGE, python=sys.executable, binds=_binds(), working_dir=str(REPO),
                         env={"PYTHONPATH": str(REPO)}, **options)


async def _docker_run_first_response() -> float:
    import aiodocker

    from flame_asgi.backends._docker_config import container_config, published_url

    config = container_config(
        image=IMAGE, command=[sys.executable, "-m", "uvicorn", "bench.fastapi_app:app", "--host", "0.0.0.0",
                              "--port", str(PORT), "--log-level", "warning", "--no-access-log"],
        env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}, port=PORT, labels={"flame_asgi.bench": "floor"},
        network=None, host_ip="127.0.0.1", binds=_binds(), init=True, cpus=None, memory=None,
        working_dir=str(REPO), host_config={})
    async with aiodocker.Docker() as docker, httpx.AsyncClient() as client:
        start = now()
        container = await docker.containers.create(config)
        try:
            await container.start()
            url = published_url((await container.show())["NetworkSettings"], PORT, host_ip="127.0.0.1",
                                network=None)
            assert url is not None, "the floor container has no published port"
            await _first_ok(client, url + "/", deadline=start + 60.0)
            return now() - start
        finally:
            await container.delete(force=True)


async def _first_ok(client: httpx.AsyncClient, url: str, deadline: float) -> None:
    # docker-proxy accepts on the published port before the app listens, then drops the
    # connection: retry at once, as DockerBackend's connect does, until the app answers.
    while True:
        try:
            response = await client.get(url, timeout=10.0)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if now() > deadline:
            raise TimeoutError(f"{url} did not answer within 60 s")
        await asyncio.sleep(0)


async def _cold_call() -> float:
    trivial = tasks.make_closure(1)
    async with FlamePool("bench-docker-cold", backend=_backend(), min=0, max=1, boot_timeout=60.0) as pool:
        start = now()
        await pool.call(trivial)
        return now() - start


async def _payload(size_mb: int, rounds: int) -> dict[str, Any]:
    async with FlamePool("bench-docker-payload", backend=_backend(), min=1, max=1, boot_timeout=60.0,
                         timeout=120.0) as pool:
        await pool.call(tasks.nothing)
        return await echo_rates(pool, size_mb, rounds, " through DockerBackend")
