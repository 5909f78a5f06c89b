"""Backends: where runners boot. ``FLAME_BACKEND`` picks one when a pool names none."""

from __future__ import annotations

from flame_asgi._base import settings
from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec
from flame_asgi.backends.local import LocalBackend
from flame_asgi.backends.process import ProcessBackend

__all__ = ["Backend", "DockerBackend", "FlyBackend", "KubernetesBackend", "LocalBackend", "ProcessBackend",
           "RunnerHandle", "RunnerSpec", "backend_from_env"]

_LAZY = {"DockerBackend": "docker", "FlyBackend": "fly", "KubernetesBackend": "kubernetes"}


def __getattr__(name: str) -> object:
    # Imported on first use: a backend's client library is only needed by those who use it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"flame_asgi.backends.{_LAZY[name]}"), name)
    raise AttributeError(name)


def backend_from_env() -> Backend:
    """The backend named by ``FLAME_BACKEND`` (``local`` when unset), configured from env."""
    name = settings.BACKEND.read()
    if name == "local":
        return LocalBackend()
    if name == "process":
        return ProcessBackend(app=settings.PROCESS_APP.read())
    if name == "fly":
        from flame_asgi.backends.fly import FlyBackend

        return FlyBackend()
    if name == "docker":
        from flame_asgi.backends.docker import DockerBackend

        return DockerBackend.from_env()
    if name == "kubernetes":
        from flame_asgi.backends.kubernetes import KubernetesBackend

        return KubernetesBackend.from_env()
    raise AssertionError(name)  # BACKEND.read() accepts nothing else
