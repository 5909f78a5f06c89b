"""The real cluster (``cluster.py``) for this package's tests: started once, before the first
of them, and stopped after the last, so it costs the rest of the suite nothing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightkube", reason="KubernetesBackend needs lightkube: pip install 'flame_asgi[kubernetes]'")

from tests.backends.kubernetes.cluster import REPO, Cluster, ClusterUnavailable


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("k8s"))
    try:
        try:
            running.start()
        except ClusterUnavailable as exc:
            pytest.skip(f"a Kubernetes cluster cannot run here: {exc}")
        yield running
    finally:
        running.stop()


def host_paths() -> list[str]:
    """What a container of the empty image needs from this machine to run this checkout's
    tests: the system, this interpreter (and the one a virtualenv points at), the checkout."""
    paths = ["/usr", "/lib", "/lib64", "/bin", "/etc", sys.prefix, sys.base_prefix, str(REPO)]
    return sorted({str(Path(p).resolve()) if p in (sys.prefix, sys.base_prefix) else p for p in paths
                   if Path(p).exists()})


def host_volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(volumes, volumeMounts)``: ``host_paths()`` mounted read-only where they are."""
    volumes, mounts = [], []
    for n, path in enumerate(host_paths()):
        volumes.append({"name": f"host-{n}", "hostPath": {"path": path}})
        mounts.append({"name": f"host-{n}", "mountPath": path, "readOnly": True})
    return volumes, mounts
