"""KubernetesBackend: not available in this release.

The name is part of the public contract so that ``from flame_asgi import
KubernetesBackend`` works everywhere; constructing it says plainly that this release
cannot boot runners on Kubernetes, instead of failing later or silently.
"""

from __future__ import annotations

from typing import Any

from flame_asgi.backends._base import Backend, RunnerHandle, RunnerSpec


class KubernetesBackend(Backend):
    """Runner Pods through the Kubernetes API (not in this release: raises on use)."""

    name = "kubernetes"

    def __init__(self, **options: Any) -> None:
        raise NotImplementedError(
            "KubernetesBackend is not available in this flame_asgi release; use ProcessBackend, "
            "DockerBackend or FlyBackend, or pin a release that ships it"
        )

    async def boot(self, spec: RunnerSpec) -> RunnerHandle:  # pragma: no cover - never constructed
        raise NotImplementedError
