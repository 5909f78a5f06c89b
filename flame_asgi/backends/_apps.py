"""Which app a runner boots: the pool's own app, found by its import string, or the bare one."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("flame_asgi.backends")
BARE_APP = "flame_asgi._bare:app"  # an empty flame_asgi app that serves only /_flame


def app_import_for(app: Any, pool: str) -> str | None:
    """``find_import_string``, saying so when the app cannot be found (runners would boot an
    empty app, without the user's lifespan)."""
    found = find_import_string(app)
    if found is None:
        log.warning(
            "pool %r: cannot find an import string for %r among the imported modules (an app built by a "
            "factory, or bound to a private name?); its runners boot an empty app without your lifespan. "
            "Pass the backend app='package.module:app' (an attribute holding the app) to boot your own app.",
            pool, app)
    return found


def find_import_string(app: Any) -> str | None:
    """Find ``module:attribute`` that names ``app`` among the imported modules."""
    fallback = None
    for name, module in list(sys.modules.items()):
        if module is None or name.startswith("flame_asgi"):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue
        for attr, value in list(namespace.items()):
            if value is app and not attr.startswith("_"):
                if name == "__main__":
                    spec = getattr(module, "__spec__", None)
                    if spec is not None and spec.name and not spec.name.endswith("__main__"):
                        fallback = f"{spec.name}:{attr}"
                    continue
                return f"{name}:{attr}"
    return fallback
