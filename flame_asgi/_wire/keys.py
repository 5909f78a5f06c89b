"""Each runner's own keys, derived from the parent's secret, and the token that opens its door.

The parent holds the root secret (``FLAME_SECRET``, or a random key per process) and
derives, per runner id, three keys with itsdangerous: one per direction of the channel
and one for the WebSocket upgrade. A runner receives only its own three (as
``FLAME_RUNNER_KEYS``, removed from its environment once read, so no subprocess inherits
them): it can neither sign for another runner nor derive anything else.

The upgrade token (``x-flame-auth`` on the WebSocket request) is signed with the upgrade
key, names the runner, carries a random nonce and a timestamp, and is checked before
the runner accepts the connection: a stranger's connection is refused at the handshake,
before the runner reads a byte of its messages; each nonce opens the door once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import secrets

import itsdangerous

from flame_asgi._base.exceptions import ProtocolError

TO_RUNNER = "to-runner"
TO_PARENT = "to-parent"
UPGRADE = "upgrade"
AUTH_HEADER = "x-flame-auth"
TOKEN_MAX_AGE = 60  # seconds; as long as a frame's, for clocks as skewed
_KEY = 32  # bytes of each derived key (HMAC-SHA256)


def derive(secret: bytes, runner_id: str, purpose: str) -> bytes:
    # The salt binds each key to one runner and one purpose: a frame recorded on one
    # runner's channel is worthless on another's, and an echo is never valid.
    signer = itsdangerous.Signer(secret, salt=f"flame-asgi:{runner_id}:{purpose}", key_derivation="hmac",
                                 digest_method=hashlib.sha256)
    return signer.derive_key()


@dataclasses.dataclass(frozen=True, repr=False)
class RunnerKeys:
    """One runner's keys: ``to_runner`` and ``to_parent`` sign the channel, ``upgrade`` its door."""

    runner_id: str
    to_runner: bytes
    to_parent: bytes
    upgrade: bytes

    @classmethod
    def derive(cls, secret: bytes, runner_id: str) -> RunnerKeys:
        return cls(runner_id, derive(secret, runner_id, TO_RUNNER), derive(secret, runner_id, TO_PARENT),
                   derive(secret, runner_id, UPGRADE))

    def encode(self) -> str:
        """What the runner's environment carries: its three keys, not the root secret."""
        return base64.urlsafe_b64encode(self.to_runner + self.to_parent + self.upgrade).decode()

    @classmethod
    def decode(cls, runner_id: str, text: str) -> RunnerKeys:
        try:
            raw = base64.urlsafe_b64decode(text.encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 3 * _KEY:
            raise ValueError("FLAME_RUNNER_KEYS is not what a flame_asgi backend sets: a runner's keys come "
                             "from its parent, never by hand")
        return cls(runner_id, raw[:_KEY], raw[_KEY:2 * _KEY], raw[2 * _KEY:])

    def __repr__(self) -> str:
        return f"<RunnerKeys of {self.runner_id}>"  # never the keys

    # -- the upgrade token ----------------------------------------------------------------------
    def _door(self) -> itsdangerous.TimestampSigner:
        # The key is already derived for this purpose: itsdangerous must not derive again.
        return itsdangerous.TimestampSigner(self.upgrade, salt=UPGRADE, key_derivation="none",
                                            digest_method=hashlib.sha256)

    def upgrade_token(self) -> str:
        """A fresh token for one WebSocket upgrade to this runner."""
        return self._door().sign(f"{self.runner_id}:{secrets.token_hex(16)}".encode()).decode()

    def check_upgrade_token(self, token: str | None) -> str:
        """The token's nonce if it is this runner's, signed with its key and recent; else ProtocolError."""
        if not token:
            raise ProtocolError("no upgrade token")
        try:
            value = self._door().unsign(token.encode(), max_age=TOKEN_MAX_AGE).decode()  # constant-time compare
        except itsdangerous.SignatureExpired:
            raise ProtocolError("expired upgrade token") from None
        except (itsdangerous.BadSignature, UnicodeDecodeError):
            raise ProtocolError("bad upgrade token") from None
        runner_id, _, nonce = value.rpartition(":")
        if runner_id != self.runner_id or not nonce:
            raise ProtocolError("upgrade token for another runner")
        return nonce
