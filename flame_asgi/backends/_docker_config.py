"""Docker without the Engine: the runner container's create request, how a container
ended, where its port is published, and the small parsers around them. Plain
functions, tested without aiodocker or a dockerd; ``docker.py`` does the API calls.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from flame_asgi._base.exceptions import BootError
from flame_asgi._wire.exits import ExitReason

LABEL_PARENT, LABEL_POOL, LABEL_RUNNER, LABEL_BACKEND = (
    "flame_asgi.parent", "flame_asgi.pool", "flame_asgi.runner", "flame_asgi.backend")
# The container the parent runs in ("" on a host): how a later parent tells whether the
# one that left a standby container behind is still alive.
LABEL_PARENT_CONTAINER = "flame_asgi.parent_container"
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def container_config(*, image: str, command: Sequence[str], env: Mapping[str, str], port: int,
                     labels: Mapping[str, str], network: str | None, host_ip: str | None, binds: Sequence[str],
                     init: bool, cpus: float | None, memory: int | None, working_dir: str | None,
                     host_config: Mapping[str, Any]) -> dict[str, Any]:
    """The Engine's create-container body for one runner (``docker run --rm`` and friends)."""
    host_mode = network == "host"
    hc: dict[str, Any] = {"AutoRemove": True, "Init": init, "Binds": list(binds)}
    if network:
        hc["NetworkMode"] = network
    if not host_mode and host_ip is not None:
        hc["PortBindings"] = {f"{port}/tcp": [{"HostIp": host_ip, "HostPort": ""}]}
    if cpus is not None:
        hc["NanoCpus"] = int(cpus * 1e9)
    if memory is not None:
        hc["Memory"] = hc["MemorySwap"] = memory  # equal: no swap, so the limit is real
    hc.update(host_config)
    config: dict[str, Any] = {
        "Image": image, "Cmd": list(command), "Env": [f"{k}={v}" for k, v in env.items()],
        "ExposedPorts": {f"{port}/tcp": {}}, "Labels": dict(labels), "HostConfig": hc,
    }
    if working_dir:
        config["WorkingDir"] = working_dir
    return config


def published_url(settings: Mapping[str, Any], port: int, *, host_ip: str | None, network: str | None) -> str | None:
    """Where the parent reaches the runner, from the container's ``NetworkSettings``."""
    if host_ip is None:  # the parent shares the container's network: dial its own address
        networks: dict[str, Any] = settings.get("Networks") or {}
        net: dict[str, Any] = networks.get(network or "bridge") or next(iter(networks.values()), {})
        return f"http://{net['IPAddress']}:{port}" if net.get("IPAddress") else None
    published = (settings.get("Ports") or {}).get(f"{port}/tcp") or []
    if not published:
        return None
    host = host_ip if host_ip not in ("", "0.0.0.0") else "127.0.0.1"
    return f"http://{host}:{published[0]['HostPort']}"


def describe_exit(name: str, code: int | None, *, oom: bool, memory: int | None) -> ExitReason:
    """How container ``name`` ended, from its exit code and whether the kernel killed it for memory."""
    subject = f"container {name}"
    if oom:
        limit = f" of {memory / 2**20:g} MiB" if memory else ""
        return ExitReason("oom", f"{subject} was killed: out of memory (OOMKilled, memory limit{limit})", code)
    if code is None:
        return ExitReason("gone", f"{subject} is gone (removed before it reported an exit code)")
    return ExitReason.from_status(subject, code, shell_codes=True)


def engine_error(what: str, exc: BaseException) -> BootError:
    """Translate an aiodocker/aiohttp error into a BootError that says what to do."""
    status, message = getattr(exc, "status", None), getattr(exc, "message", None) or str(exc) or repr(exc)
    hint = ""
    if status == 900 or isinstance(exc, OSError):
        hint = "; is dockerd running? set docker_url= or DOCKER_HOST"
    elif status == 404 and "image" in message.lower():
        hint = "; build or load the image on that Docker host (runners never pull)"
    return BootError(f"{what}: {message}{hint}", reason=f"docker: {message}")


def parse_memory(value: int | str | None) -> int | None:
    """``512m``, ``1g``, ``256MiB`` or bytes, as ``docker run --memory`` takes them."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if match is None:
        raise ValueError(f"memory={value!r}: use bytes or a size such as '512m' or '2g'")
    return int(float(match[1]) * _UNITS[match[2]])


def parent_id() -> str:
    """This process's id in container labels (``host-pid-random``), fresh after a fork."""
    global _parent
    if _parent is None or _parent[0] != os.getpid():
        _parent = (os.getpid(), f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    return _parent[1]


_parent: tuple[int, str] | None = None


def container_name(runner_id: str) -> str:
    return "flame-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", runner_id)


def own_container_id() -> str | None:
    """The id of the container this process runs in, from its mount table (cgroup v1 and v2)."""
    for path in ("/proc/self/mountinfo", "/proc/self/cgroup"):
        with contextlib.suppress(OSError), open(path) as f:
            found = container_id_in(f.read())
            if found:
                return found
    return None


def container_id_in(text: str) -> str | None:
    match = re.search(r"/containers/([0-9a-f]{64})/|/docker[/-]([0-9a-f]{64})", text)
    return (match[1] or match[2]) if match else None
