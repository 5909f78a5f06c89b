"""The last guards of DockerBackend: the containers a parent did not get to remove.

``remove_labelled`` runs from ``atexit``, when no event loop is left, so it speaks plain
HTTP to the Engine (its Unix socket or a TCP address) with the standard library alone.
``remove_orphans`` runs when a backend first reaches the Engine, for the standby
containers of parents that were killed.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import urllib.parse
from typing import TYPE_CHECKING

from flame_asgi.backends._docker_config import LABEL_PARENT, LABEL_PARENT_CONTAINER

if TYPE_CHECKING:
    import aiodocker

__all__ = ["remove_labelled", "remove_orphans"]
log = logging.getLogger("flame_asgi.backends.docker")


def remove_labelled(url: str, label: str, timeout: float = 2.0) -> int:
    """Force-remove every container with ``label`` (plain HTTP, no event loop needed)."""
    scheme, _, address = url.partition("://")
    if scheme == "unix":
        conn: http.client.HTTPConnection = _UnixHTTPConnection(address, timeout)
    elif scheme in ("tcp", "http"):
        conn = http.client.HTTPConnection(address.rstrip("/"), timeout=timeout)
    else:
        return 0  # TLS or ssh Engines: the runners' own watchdog and AutoRemove still apply
    try:
        query = urllib.parse.urlencode({"all": "1", "filters": json.dumps({"label": [label]})})
        conn.request("GET", f"/containers/json?{query}")
        found = json.loads(conn.getresponse().read())
        for item in found:
            conn.request("DELETE", f"/containers/{item['Id']}?force=1")
            conn.getresponse().read()
        return len(found)
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


async def remove_orphans(docker: aiodocker.Docker, own_parent: str) -> int:
    """Remove standby containers (created, never started) whose parent is gone.

    A running runner whose parent dies exits by itself and AutoRemove deletes it; a
    container that never started has nothing to exit, so a killed parent's standby
    containers would stay forever. Any later DockerBackend on the Engine removes them.
    """
    from aiodocker.exceptions import DockerError

    async def parent_alive(parent: str, container: str) -> bool:
        if container:  # the parent ran in a container: is it still running?
            try:
                return bool((await docker.containers.container(container).show())["State"]["Running"])
            except DockerError as exc:
                return exc.status != 404  # the Engine could not say: keep it
        host, _, rest = parent.rpartition("-")[0].rpartition("-")  # "host-pid-token"
        if host != socket.gethostname() or not rest.isdigit():
            return True  # another machine's process: nothing here can tell, keep it
        try:
            os.kill(int(rest), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    created = await docker.containers.list(all=True, filters={"status": ["created"], "label": [LABEL_PARENT]})
    removed = 0
    for container in created:
        labels = container._container.get("Labels") or {}
        parent = labels.get(LABEL_PARENT, "")
        if parent == own_parent or await parent_alive(parent, labels.get(LABEL_PARENT_CONTAINER, "")):
            continue
        try:
            await container.delete(force=True)
            removed += 1
        except DockerError as exc:
            log.debug("could not remove orphan standby container %s: %s", container.id[:12], exc)
    if removed:
        log.info("DockerBackend: removed %d standby container(s) left by a parent that is gone", removed)
    return removed
