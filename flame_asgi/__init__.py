"""flame_asgi: run any function of your ASGI app in a short-lived copy of the whole app.

    pool = add_flame_pool(app, "thumbs", backend=ProcessBackend(), max=4)
    result = await pool.call(make_thumbnails, video_path)

FastAPI and Starlette apps take pools as they are; any other ASGI app (Litestar, Quart,
Django) is wrapped first: ``app = FlameApp(app)``.

The public surface is exactly ``__all__``; everything else is private.
"""

from flame_asgi import backends
from flame_asgi._asgi.any_app import FlameApp
from flame_asgi._asgi.app import FastAPI
from flame_asgi._asgi.dependencies import flame_pool, flame_runner
from flame_asgi._asgi.extension import add_flame_pool
from flame_asgi._asgi.relay import relay
from flame_asgi._base.exceptions import (
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
from flame_asgi._base.parent import ParentInfo, parent
from flame_asgi._base.version import VERSION as __version__  # noqa: F401 - the package version
from flame_asgi._observe.telemetry import subscribe
from flame_asgi._pool.child import ChildHandle
from flame_asgi._pool.lease import FlameRunner
from flame_asgi._pool.map import MapIterator
from flame_asgi._pool.pool import FlamePool
from flame_asgi._pool.runners import PoolStats, RunnerInfo
from flame_asgi._pool.stream import RemoteStream
from flame_asgi._runner.progress import receive, report
from flame_asgi._wire.tracking import Trackable, release
from flame_asgi._wire.transfer import RemoteBytes, Upload
from flame_asgi.backends import Backend, LocalBackend, ProcessBackend


def __getattr__(name: str) -> object:
    # DockerBackend, FlyBackend, KubernetesBackend: loaded on first use (optional extras).
    if name in ("DockerBackend", "FlyBackend", "KubernetesBackend"):
        return getattr(backends, name)
    raise AttributeError(f"module 'flame_asgi' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BootError",
    "CallTimeout",
    "ChildHandle",
    "DockerBackend",
    "FastAPI",
    "FlameApp",
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
