"""Signed frames between a parent and one runner, and the pickling rules for what they carry.

A frame is ``[u32 header length][signed header][payload]``. The header is JSON signed
with itsdangerous (HMAC-SHA256, timestamped); it names the session, a per-direction
sequence number and the SHA-256 of the payload. ``FrameOpener.open`` checks, in order:
size, signature (constant-time), age, session, sequence, payload digest; only a frame
that passes all of them has its payload handed to the unpickler.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import struct
from typing import Any

import itsdangerous

from flame_asgi._exceptions import PayloadTooLarge, ProtocolError

MAX_AGE_SECONDS = 60
DEFAULT_MAX_PAYLOAD = 512 * 1024 * 1024
_LEN = struct.Struct(">I")
_MAX_HEADER = 64 * 1024

_RESERVED = frozenset({"s", "n", "t", "i", "d"})  # header fields the codec owns
TO_RUNNER = "to-runner"
TO_PARENT = "to-parent"


def max_payload_from_env() -> int:
    value = os.environ.get("FLAME_MAX_PAYLOAD")
    return int(value) if value else DEFAULT_MAX_PAYLOAD


class _Signer(itsdangerous.TimestampSigner):
    """A TimestampSigner whose derived keys are computed once, not per message."""

    def __init__(self, secret: bytes, salt: str) -> None:
        super().__init__(secret, salt=salt, key_derivation="hmac", digest_method=hashlib.sha256)
        self._keys: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        raw = itsdangerous.encoding.want_bytes(
            self.secret_keys[-1] if secret_key is None else secret_key
        )
        key = self._keys.get(raw)
        if key is None:
            key = self._keys[raw] = super().derive_key(raw)
        return key


def make_signer(secret: bytes, runner_id: str, direction: str) -> itsdangerous.TimestampSigner:
    # The salt binds each key to one runner and one direction: a frame recorded on
    # one runner's channel is worthless on another's, and an echo is never valid.
    return _Signer(secret, salt=f"flame-asgi:{runner_id}:{direction}")


@dataclasses.dataclass(frozen=True)
class Frame:
    type: str
    id: int
    meta: dict[str, Any]
    payload: memoryview  # a view into the received frame: large payloads are not copied


class FrameSealer:
    """Signs outgoing frames for one direction of one session."""

    def __init__(self, signer: itsdangerous.TimestampSigner, session: str, max_payload: int) -> None:
        self._signer = signer
        self.session = session
        self._seq = 0
        self._max_payload = max_payload

    def seal(self, type_: str, id_: int = 0, payload: bytes = b"", **meta: Any) -> bytes:
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"message of {len(payload):,} bytes exceeds the {self._max_payload:,}-byte limit "
                "(FLAME_MAX_PAYLOAD); send a path or stream the data in pieces instead"
            )
        self._seq += 1
        if _RESERVED.intersection(meta):
            raise ValueError(f"message fields {sorted(_RESERVED.intersection(meta))} are reserved")
        header = {"s": self.session, "n": self._seq, "t": type_, "i": id_, **meta}
        if payload:
            header["d"] = hashlib.sha256(payload).hexdigest()
        signed = self._signer.sign(json.dumps(header, separators=(",", ":")))
        return b"".join((_LEN.pack(len(signed)), signed, payload))


class FrameOpener:
    """Verifies incoming frames; the first one must be a ``hello`` that fixes the session."""

    def __init__(self, signer: itsdangerous.TimestampSigner, max_payload: int, session: str | None = None) -> None:
        self._signer = signer
        self.session = session
        self._seq = 0
        self._max_payload = max_payload

    def open(self, frame: bytes) -> Frame:
        if len(frame) < _LEN.size:
            raise ProtocolError("truncated frame")
        (hlen,) = _LEN.unpack_from(frame)
        if hlen > _MAX_HEADER or _LEN.size + hlen > len(frame):
            raise ProtocolError("malformed frame header")
        payload = memoryview(frame)[_LEN.size + hlen :]
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"message of {len(payload):,} bytes exceeds the {self._max_payload:,}-byte limit"
            )
        try:
            raw = self._signer.unsign(frame[_LEN.size : _LEN.size + hlen], max_age=MAX_AGE_SECONDS)
        except itsdangerous.SignatureExpired:
            raise ProtocolError("stale message refused (signature older than "
                                f"{MAX_AGE_SECONDS} s or from the future)") from None
        except itsdangerous.BadSignature:
            raise ProtocolError("message with a bad or missing signature refused") from None
        try:
            header = json.loads(raw)
        except ValueError:
            raise ProtocolError("signed header is not JSON") from None
        if self.session is None:
            if header.get("t") != "hello" or header.get("n") != 1:
                raise ProtocolError("the first message of a session must be hello")
            self.session = header["s"]
        elif header.get("s") != self.session:
            raise ProtocolError("message from another session refused (replay?)")
        if header.get("n") != self._seq + 1:
            raise ProtocolError(
                f"out-of-order message refused (sequence {header.get('n')}, expected {self._seq + 1}: replay?)"
            )
        digest = header.pop("d", None)
        if payload:
            actual = hashlib.sha256(payload).hexdigest()
            if digest is None or not hmac.compare_digest(actual, digest):
                raise ProtocolError("payload does not match its signed digest (tampered)")
        elif digest is not None:
            raise ProtocolError("payload missing")
        self._seq += 1
        return Frame(header.pop("t"), header.pop("i", 0), header, payload)
