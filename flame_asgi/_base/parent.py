"""The FLAME_PARENT codec, ``parent()``, and the code fingerprint that travels in it.

A runner learns everything about its parent from one environment variable, set by
the backend that boots it. Its presence is also what switches an app into runner mode.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import socket

from flame_asgi._base.settings import CODE_VERSION, MAX_PAYLOAD, PARENT, SECRET

# The names, for modules that pass these variables on to runners.
ENV_PARENT = PARENT.name
ENV_SECRET = SECRET.name
ENV_CODE_VERSION = CODE_VERSION.name


@dataclasses.dataclass(frozen=True)
class ParentInfo:
    """What a runner knows of its parent (decoded from ``FLAME_PARENT``)."""

    pool: str
    runner_id: str
    parent_address: str
    backend: str
    code_version: str
    app: str
    failsafe_timeout: float = 30.0
    heartbeat_interval: float = 2.5
    heartbeat_timeout: float = 10.0
    shutdown_timeout: float | None = 30.0
    max_payload: int = MAX_PAYLOAD.default

    def encode(self) -> str:
        raw = json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def decode(cls, value: str) -> ParentInfo:
        try:
            data = json.loads(base64.urlsafe_b64decode(value.encode()))
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{ENV_PARENT} is set but cannot be decoded ({exc}); it must be set by a "
                "flame_asgi backend, not by hand"
            ) from None


# Local runners share the parent's process, so their "environment" is a context variable.
_local_parent: contextvars.ContextVar[ParentInfo | None] = contextvars.ContextVar(
    "flame_local_parent", default=None
)


def parent() -> ParentInfo | None:
    """``None`` in a normal process; inside a runner, the decoded ``FLAME_PARENT``."""
    info = _local_parent.get()
    if info is not None:
        return info
    value = PARENT.read()
    return _decode_cached(value) if value is not None else None


@functools.lru_cache(maxsize=8)
def _decode_cached(value: str) -> ParentInfo:
    return ParentInfo.decode(value)


def runner_mode() -> bool:
    """True when this process was booted as a runner (``FLAME_PARENT`` is set)."""
    return PARENT.read() is not None


def parent_address() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def code_version(app_import: str) -> str:
    """Fingerprint of the source of flame_asgi and of the package that holds the app.

    ``FLAME_CODE_VERSION`` (a git sha, an image tag) replaces it when set, for
    deployments that name their builds and where hashing source files is not meaningful.
    """
    return CODE_VERSION.read() or _source_fingerprint(app_import)


@functools.lru_cache(maxsize=32)
def _source_fingerprint(app_import: str) -> str:
    digest = hashlib.sha256()
    _hash_tree(digest, pathlib.Path(__file__).parent)
    root = _package_root(app_import.partition(":")[0])
    if root is not None:
        _hash_tree(digest, root)
    return digest.hexdigest()[:16]


def _package_root(module: str) -> pathlib.Path | None:
    top = module.split(".")[0]
    if top == "flame_asgi":
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    origin = pathlib.Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def _hash_tree(digest: hashlib._Hash, root: pathlib.Path) -> None:
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in files:
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(root.parent)).encode())
        digest.update(path.read_bytes())
