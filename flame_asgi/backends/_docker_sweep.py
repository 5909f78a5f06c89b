"""The last guard of DockerBackend: at interpreter exit, remove the containers this process still has.

It runs from ``atexit``, when no event loop is left, so it speaks plain HTTP to the Engine
(its Unix socket or a TCP address) with the standard library alone.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

__all__ = ["remove_labelled"]


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
