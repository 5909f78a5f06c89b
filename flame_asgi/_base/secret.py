"""The parent's root key: ``FLAME_SECRET`` when set, else one random key per parent process.

Runners never receive it: each gets only the keys derived from it for its own id
(``_keys``). It is never logged, shown in a repr, or put in an error message.
"""

from __future__ import annotations

import secrets

from flame_asgi._base.settings import SECRET

_generated: str | None = None


def channel_secret() -> str:
    global _generated
    configured = SECRET.read()
    if configured:
        return configured
    if _generated is None:
        _generated = secrets.token_urlsafe(32)
    return _generated
