"""flame_asgi: run any function of your FastAPI or Starlette app in a short-lived copy of the whole app.

    pool = add_flame_pool(app, "thumbs", backend=ProcessBackend(), max=4)
    result = await pool.call(make_thumbnails, video_path)

The public surface is exactly ``__all__``; everything else is private.
"""

from flame_asgi._app import FastAPI
from flame_asgi._child import ChildHandle
from flame_asgi._dependencies import flame_pool, flame_runner
from flame_asgi._exceptions import (
    BootError,
    CallTimeout,
    FlameError,
    PayloadTooLarge,
    PoolClosed,
    ProtocolError,
    RemoteError,
    RunnerLost,
    SerializationError,
    TransferError,
    VersionSkew,
)
from flame_asgi._extension import add_flame_pool
from flame_asgi._lease import FlameRunner
from flame_asgi._map import MapIterator
from flame_asgi._parent import ParentInfo, parent
from flame_asgi._pool import FlamePool, PoolStats, RunnerInfo
from flame_asgi._progress import receive, report
from flame_asgi._relay import relay
from flame_asgi._stream import RemoteStream
from flame_asgi._telemetry import subscribe
from flame_asgi._tracking import Trackable, release
from flame_asgi._transfer import RemoteBytes, Upload
from flame_asgi.backends import Backend, LocalBackend, ProcessBackend

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # DockerBackend, FlyBackend, KubernetesBackend: loaded on first use (optional extras).
    if name in ("DockerBackend", "FlyBackend", "KubernetesBackend"):
        from flame_asgi import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'flame_asgi' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BootError",
    "CallTimeout",
    "ChildHandle",
    "DockerBackend",
    "FastAPI",
    "FlameError",
    "FlamePool",
    "FlameRunner",
    "FlyBackend",
    "KubernetesBackend",
    "LocalBackend",
    "MapIterator",
    "ParentInfo",
    "PayloadTooLarge",
    "PoolClosed",
    "PoolStats",
    "ProcessBackend",
    "ProtocolError",
    "RemoteBytes",
    "RemoteError",
    "RemoteStream",
    "RunnerInfo",
    "RunnerLost",
    "SerializationError",
    "Trackable",
    "TransferError",
    "Upload",
    "VersionSkew",
    "add_flame_pool",
    "flame_pool",
    "flame_runner",
    "parent",
    "receive",
    "relay",
    "release",
    "report",
    "subscribe",
]
