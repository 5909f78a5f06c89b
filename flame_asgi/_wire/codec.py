"""Signed frames between a parent and one runner, and the checks before any unpickling.

A frame is ``[u32 header length][header][signature][payload]``. The header is JSON: the
session, a per-direction sequence number, the send time, the message type and the
SHA-256 of the payload. The signature is HMAC-SHA256 over the header (``hmac.digest``,
one C call: itsdangerous' ``HMACAlgorithm`` built an HMAC object per frame), compared in
constant time (``hmac.compare_digest``), with a key that itsdangerous derives from the
secret and a per-runner, per-direction salt (``_keys``).
``FrameOpener.open`` checks, in order: size, signature, age, session, sequence, payload
digest; only a frame that passes all of them has its payload handed to the unpickler.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import struct
import time
from collections.abc import Callable
from typing import Any

from flame_asgi._base.exceptions import PayloadTooLarge, ProtocolError
from flame_asgi._wire.keys import TO_PARENT as TO_PARENT  # re-exported: the directions name keys
from flame_asgi._wire.keys import TO_RUNNER as TO_RUNNER
from flame_asgi._wire.keys import derive
from flame_asgi._wire.protocol import FrameType
from flame_asgi._wire.shm import SharedMemory, SharedMemoryError

MAX_AGE_SECONDS = 60
_LEN = struct.Struct(">I")
_SIG = 32  # HMAC-SHA256
_MAX_HEADER = 64 * 1024
TREE_MIN = 16 * 1024 * 1024  # payloads from this size are hashed in pieces, in parallel
TREE_CHUNK = 4 * 1024 * 1024
_hashers: concurrent.futures.ThreadPoolExecutor | None = None
_RESERVED = frozenset({"s", "n", "t", "i", "d", "ts", "sh", "a"})  # header fields the codec owns
_encode_header = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators) builds one per call
_decode_header = json.JSONDecoder().decode

def digest_of(payload: bytes | memoryview) -> str:
    """The SHA-256 a frame's header carries for its payload.

    Payloads of ``TREE_MIN`` bytes or more are hashed in ``TREE_CHUNK`` pieces on two
    threads (hashlib releases the GIL), and the digest is the SHA-256 of the pieces'
    digests: on two cores, a 100 MB payload is checked in ~55 ms instead of ~85 ms.
    """
    return start_digest(payload)()


def start_digest(payload: bytes | memoryview) -> Callable[[], str]:
    """``digest_of(payload)``, begun now on the hashing threads (for a large payload):
    the call returns it, meanwhile this thread can do other work with the same bytes."""
    if len(payload) < TREE_MIN:
        digest = hashlib.sha256(payload).hexdigest()
        return lambda: digest
    view = memoryview(payload).cast("B")
    global _hashers
    if _hashers is None:
        _hashers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flame-digest")
    pieces = [_hashers.submit(lambda start: hashlib.sha256(view[start:start + TREE_CHUNK]).digest(), start)
              for start in range(0, len(view), TREE_CHUNK)]
    return lambda: "t" + hashlib.sha256(b"".join(piece.result() for piece in pieces)).hexdigest()


class FrameKey:
    """The key of one direction of one runner's channel (derived by ``_keys``)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return hmac.digest(self._key, data, "sha256")

    def verify(self, data: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, data, "sha256"), signature)  # constant time

    def __repr__(self) -> str:
        return "<FrameKey>"  # never the key


def make_signer(secret: bytes, runner_id: str, direction: str) -> FrameKey:
    """The parent's key for one direction of runner ``runner_id``'s channel."""
    return FrameKey(derive(secret, runner_id, direction))


@dataclasses.dataclass(frozen=True)
class Frame:
    type: str  # as received: _protocol's is_* guards narrow it to a FrameType
    id: int
    meta: dict[str, Any]
    payload: memoryview  # a view into the received frame: large payloads are not copied


class FrameSealer:
    """Signs outgoing frames for one direction of one session."""

    def __init__(self, key: FrameKey, session: str, max_payload: int,
                 clock: Callable[[], float] = time.time, shm: SharedMemory | None = None) -> None:
        self._key = key
        self.session = session
        self._seq = 0
        self._max_payload = max_payload
        self._clock = clock
        self._shm = shm

    def seal(self, type_: FrameType, id_: int = 0, payload: bytes = b"", **meta: Any) -> bytes:
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"message of {len(payload):,} bytes exceeds the {self._max_payload:,}-byte limit "
                "(FLAME_MAX_PAYLOAD); send a path, or wrap the data in flame_asgi.Upload to stream it"
            )
        if _RESERVED.intersection(meta):
            raise ValueError(f"message fields {sorted(_RESERVED.intersection(meta))} are reserved")
        self._seq += 1
        header = {"s": self.session, "n": self._seq, "ts": int(self._clock()), "t": type_, "i": id_, **meta}
        digest = start_digest(payload) if payload else None
        if self._shm is not None:
            ack = self._shm.take_ack()
            if ack:
                header["a"] = ack  # the peer may close the memfds of its frames up to this one
            if self._shm.wants(len(payload)):
                # Copied into sealed memory here while the hashing threads read the same
                # bytes: the two overlap instead of taking turns (~25 ms of 100 MB's ~70).
                header["sh"] = self._shm.put(self._seq, payload)
                payload = b""
        if digest is not None:
            header["d"] = digest()
        raw = _encode_header(header).encode()
        return b"".join((_LEN.pack(len(raw)), raw, self._key.sign(raw), payload))


class FrameOpener:
    """Verifies incoming frames; the first one must be a ``hello`` that fixes the session."""

    def __init__(self, key: FrameKey, max_payload: int, session: str | None = None,
                 shm: SharedMemory | None = None) -> None:
        self._key = key
        self.session = session
        self._seq = 0
        self._max_payload = max_payload
        self._shm = shm

    def open(self, frame: bytes) -> Frame:
        if len(frame) < _LEN.size:
            raise ProtocolError("truncated frame")
        (hlen,) = _LEN.unpack_from(frame)
        body = _LEN.size + hlen + _SIG
        if hlen > _MAX_HEADER or body > len(frame):
            raise ProtocolError("malformed frame header")
        payload = memoryview(frame)[body:]
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"message of {len(payload):,} bytes exceeds the {self._max_payload:,}-byte limit"
            )
        raw = frame[_LEN.size : _LEN.size + hlen]
        if not self._key.verify(raw, frame[_LEN.size + hlen : body]):
            raise ProtocolError("message with a bad or missing signature refused")
        try:
            header = _decode_header(raw.decode())
        except ValueError:  # UnicodeDecodeError too
            raise ProtocolError("signed header is not JSON") from None
        age = time.time() - header.get("ts", 0)
        if not -MAX_AGE_SECONDS <= age <= MAX_AGE_SECONDS:
            raise ProtocolError(f"stale message refused (sent {age:.0f} s ago; more than {MAX_AGE_SECONDS} s "
                                "apart, or the clocks disagree)")
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
        ref = header.pop("sh", None)
        if ref is not None:  # the payload is in the sender's sealed memory (``_shm``)
            if payload or self._shm is None:
                raise ProtocolError("unexpected shared-memory reference")
            try:
                payload = self._shm.get(header["n"], ref, self._max_payload)
            except SharedMemoryError as exc:
                raise ProtocolError(str(exc)) from None
        ack = header.pop("a", None)
        if ack is not None and self._shm is not None:
            self._shm.acknowledged(int(ack))
        if payload:
            actual = digest_of(payload)
            if digest is None or not hmac.compare_digest(actual, digest):
                raise ProtocolError("payload does not match its signed digest (tampered)")
        elif digest is not None:
            raise ProtocolError("payload missing")
        self._seq += 1
        for field in ("s", "n", "ts"):
            header.pop(field, None)
        return Frame(header.pop("t"), header.pop("i", 0), header, payload)
