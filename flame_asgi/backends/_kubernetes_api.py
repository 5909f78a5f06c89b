"""Speaking to the Kubernetes API: its errors translated into BootErrors that say what to
fix, list/watch iteration with those errors, and the synchronous last-resort cleanup at
interpreter exit. ``kubernetes.py`` is the backend around them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from flame_asgi._base.exceptions import BootError

RBAC_HINT = "docs/kubernetes-rbac.yaml lists what the backend needs"


# -- errors -----------------------------------------------------------------------------------
def api_error(exc: BaseException, verb: str, resource: str, namespace: str, server: str) -> BootError:
    """Translate a lightkube/httpx error into a BootError that says what to fix."""
    from lightkube import ApiError

    if isinstance(exc, BootError):
        return exc
    code: int | None = None
    if isinstance(exc, ApiError):
        code, message = exc.status.code, exc.status.message or str(exc)
    elif isinstance(status := getattr(getattr(exc, "response", None), "status_code", None), int):
        code, message = status, str(exc).splitlines()[0]  # a refused watch raises httpx's HTTPStatusError
    if code is not None:
        if code == 403:
            return BootError(f"KubernetesBackend: the API server forbids {verb!r} on {resource!r} in namespace "
                             f"{namespace!r}: {message}. Grant the verb {verb!r} on {resource!r} to the parent's "
                             f"service account ({RBAC_HINT})", reason=f"forbidden: {verb} {resource}")
        if code == 401:
            return BootError(f"KubernetesBackend: the API server at {server} rejected our credentials (HTTP 401: "
                             f"{message})", reason="unauthorized")
        return BootError(f"KubernetesBackend: {verb} {resource} in namespace {namespace!r} failed: HTTP {code}: "
                         f"{message}", reason=f"HTTP {code}: {message}")
    return BootError(f"KubernetesBackend: cannot reach the Kubernetes API server at {server} ({verb} {resource}): "
                     f"{exc!r}", reason=repr(exc))


async def aiter_api(source: Any, namespace: str, server: str, verb: str, resource: str) -> Any:
    """Iterate a lightkube watch or list, translating its errors."""
    iterator = source.__aiter__()
    try:
        while True:
            try:
                item = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise api_error(exc, verb, resource, namespace, server) from None
            yield item
    finally:
        with contextlib.suppress(Exception):
            await iterator.aclose()


# -- the last guard: at interpreter exit, delete what a backend still owns -------------------
def _delete_now(config: Any, namespace: str, names: set[str]) -> None:
    if not names:
        return
    from lightkube import Client
    from lightkube.resources.core_v1 import Pod, Secret

    client = Client(config, namespace=namespace)
    for name in list(names):
        for kind in (Pod, Secret):
            with contextlib.suppress(Exception):
                client.delete(kind, name, namespace=namespace, grace_period=0)
