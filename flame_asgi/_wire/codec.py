"""Signed frames between a parent and one runner, and the checks before any unpickling.

A frame is ``[u32 header length][header][signature][payload]``. The header is JSON: the
session, a per-direction sequence number, the send time, the message type and the
payload's check. The signature is HMAC-SHA256 over the header (``hmac.digest``, one C
call: itsdangerous' ``HMACAlgorithm`` built an HMAC object per frame), compared in
constant time (``hmac.compare_digest``), with a key that itsdangerous derives from the
secret and a per-runner, per-direction salt (``_keys``).

The payload's check is in the signed header: for a small payload its SHA-256 (``d``); from
``MAC_MIN`` bytes a Poly1305 tag (``m``) under a one-time key derived from the channel's key,
the session and the frame's sequence number (so no two frames share one, as Poly1305
requires). Poly1305 reads ~10 GB/s here against SHA-256's ~1.1 GB/s, and a large payload is
checked twice per crossing (sender and receiver); below ``MAC_MIN`` the key derivation and
the library call cost more than hashing. Either check is keyed by what only the two ends
know (the tag directly, the digest through the header's signature), so a payload changed
in flight, or written into shared memory by another process before it was sealed, fails.
``FrameOpener.open`` checks, in order: size, signature, age, session, sequence, payload;
only a frame that passes all of them has its payload handed to the unpickler.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.poly1305 import Poly1305

from flame_asgi._base.exceptions import PayloadTooLarge, ProtocolError
from flame_asgi._wire.keys import TO_PARENT as TO_PARENT  # re-exported: the directions name keys
from flame_asgi._wire.keys import TO_RUNNER as TO_RUNNER
from flame_asgi._wire.keys import derive
from flame_asgi._wire.payload import Payload, Pickled, check_layout, keep, parts_of, split
from flame_asgi._wire.protocol import FrameType, is_transfer
from flame_asgi._wire.shm import OVERLAP_MIN, SharedMemory, SharedMemoryError

MAX_AGE_SECONDS = 60
_LEN = struct.Struct(">I")
_SIG = 32  # HMAC-SHA256
_MAX_HEADER = 64 * 1024
_ZEROS = bytes(16)
MAC_MIN = 16 * 1024  # payloads from this size are checked with Poly1305, smaller ones with SHA-256
_RESERVED = frozenset({"s", "n", "t", "i", "d", "m", "ts", "sh", "a", "b", "dp", "z"})  # header fields the codec owns
_encode_header = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators) builds one per call
_decode_header = json.JSONDecoder().decode
_tagger: concurrent.futures.ThreadPoolExecutor | None = None  # made on first use: never before a fork


def digest_of(parts: Sequence[bytes | memoryview]) -> str:
    """The SHA-256 of the parts laid end to end (a small payload's check)."""
    whole = hashlib.sha256()
    for part in parts:
        whole.update(part)
    return whole.hexdigest()


class FrameKey:
    """The key of one direction of one runner's channel (derived by ``_keys``)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._mac_root: bytes | None = None

    def sign(self, data: bytes) -> bytes:
        return hmac.digest(self._key, data, "sha256")

    def verify(self, data: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, data, "sha256"), signature)  # constant time

    def tag(self, session: str, seq: int, parts: Sequence[bytes | memoryview]) -> str:
        """The Poly1305 tag of the parts laid end to end, under the one-time key of frame
        ``seq`` of ``session``."""
        if self._mac_root is None:  # a key of its own: never the one that signs headers
            self._mac_root = hmac.digest(self._key, b"flame-asgi payload mac", "sha256")
        mac = Poly1305(hmac.digest(self._mac_root, f"{session}:{seq}".encode(), "sha256"))
        for part in parts:
            mac.update(part)
            if len(part) % 16:
                # Each part padded to Poly1305's 16-byte block (the layout, signed, says
                # where parts end): a part that began mid-block was read at a third of the
                # speed (a 100 MB buffer after its 68-byte pickle: 50 ms instead of 17).
                mac.update(_ZEROS[len(part) % 16:])
        return mac.finalize().hex()

    def start_check(self, session: str, seq: int, parts: Sequence[bytes | memoryview],
                    copying: bool = True) -> tuple[str, Callable[[], str]]:
        """The header field for a payload's check (``d`` or ``m``) and a call that returns the
        check. From ``OVERLAP_MIN``, when the caller is ``copying`` the same bytes meanwhile,
        the tag is begun on another thread (Poly1305 releases the GIL)."""
        size = sum(len(part) for part in parts)
        if size < MAC_MIN:
            digest = digest_of(parts)
            return "d", lambda: digest
        if size < OVERLAP_MIN or not copying:
            tag = self.tag(session, seq, parts)
            return "m", lambda: tag
        global _tagger
        if _tagger is None:
            _tagger = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flame-mac")
        return "m", _tagger.submit(self.tag, session, seq, parts).result

    def __repr__(self) -> str:
        return "<FrameKey>"  # never the key


def make_signer(secret: bytes, runner_id: str, direction: str) -> FrameKey:
    """The parent's key for one direction of runner ``runner_id``'s channel."""
    return FrameKey(derive(secret, runner_id, direction))


class DataPlane(Protocol):
    """Where a sealer leaves payloads that travel beside the channel (``_wire.dataplane``)."""

    def wants(self, size: int) -> bool: ...

    def put(self, seq: int, parts: Sequence[bytes | memoryview]) -> int: ...


class NeedsData(Exception):
    """A verified frame whose payload travels on the data plane: fetch it, then open the
    frame again with it (``FrameOpener.open(frame, external=...)``)."""

    def __init__(self, key: int, layout: list[int]) -> None:
        super().__init__(key)
        self.key = key
        self.layout = layout


@dataclasses.dataclass(frozen=True)
class Frame:
    type: str  # as received: _protocol's is_* guards narrow it to a FrameType
    id: int
    meta: dict[str, Any]
    # A view into the received frame (large payloads are not copied) or into the sender's
    # sealed memory; or, for a payload sent out of band, its pickle and buffers.
    payload: memoryview | Pickled

    def whole(self) -> memoryview:
        """The payload of a frame that is always one piece (a transfer's chunk)."""
        if isinstance(self.payload, Pickled):
            raise ProtocolError(f"a {self.type} message cannot carry out-of-band buffers")
        return self.payload


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
        self.dp: DataPlane | None = None  # set once the peer's data plane answered

    def seal(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> bytes:
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"message of {len(payload):,} bytes exceeds the {self._max_payload:,}-byte limit "
                "(FLAME_MAX_PAYLOAD); send a path, or wrap the data in flame_asgi.Upload to stream it"
            )
        if _RESERVED.intersection(meta):
            raise ValueError(f"message fields {sorted(_RESERVED.intersection(meta))} are reserved")
        # Taken for good only once the frame is made: a frame that failed to seal leaves no
        # gap, which the peer would refuse as a replay and end the session.
        seq = self._seq + 1
        header = {"s": self.session, "n": seq, "ts": int(self._clock()), "t": type_, "i": id_, **meta}
        parts = parts_of(payload)
        if isinstance(payload, Pickled):
            header["b"] = payload.layout
        to_shm = self._shm is not None and self._shm.wants(len(payload))
        # A stream's chunks stay on the channel: they are many, in a window, and each a
        # connection of its own would cost more than it saves.
        to_dp = not to_shm and self.dp is not None and not is_transfer(type_) and self.dp.wants(len(payload))
        field, check = self._key.start_check(self.session, seq, parts, to_shm) if payload else ("", None)
        if to_dp:
            assert self.dp is not None
            header["dp"] = self.dp.put(seq, parts)
            if not isinstance(payload, Pickled):
                header["z"] = len(payload)
            parts = ()
        if self._shm is not None:
            ack = self._shm.take_ack()
            if ack:
                header["a"] = ack  # the peer may close the memfds of its frames up to this one
            if to_shm:
                # Copied into sealed memory while a large payload's tag is computed: the two
                # overlap instead of taking turns (100 MB: 34 ms instead of 52).
                ref = self._shm.put(seq, parts)
                if ref is not None:  # else the kernel refused a memfd: the payload stays in the frame
                    header["sh"] = ref
                    parts = ()
        if check is not None:
            header[field] = check()
        raw = _encode_header(header).encode()
        self._seq = seq
        return b"".join((_LEN.pack(len(raw)), raw, self._key.sign(raw), *parts))


class FrameOpener:
    """Verifies incoming frames; the first one must be a ``hello`` that fixes the session."""

    def __init__(self, key: FrameKey, max_payload: int, session: str | None = None,
                 shm: SharedMemory | None = None) -> None:
        self._key = key
        self.session = session
        self._seq = 0
        self._max_payload = max_payload
        self._shm = shm

    def open(self, frame: bytes, external: Sequence[bytes] | None = None) -> Frame:
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
        tag = header.pop("m", None)
        ref = header.pop("sh", None)
        layout = header.pop("b", None)
        elsewhere, size = header.pop("dp", None), header.pop("z", None)
        session, seq = header["s"], header["n"]
        if elsewhere is not None:  # the payload travels on the data plane
            wanted = layout if layout is not None else [size]
            if (payload or ref is not None or type(elsewhere) is not int or not isinstance(wanted, list)
                    or not all(type(n) is int and n >= 0 for n in wanted)):
                raise ProtocolError("malformed data-plane reference")
            if sum(wanted) > self._max_payload:
                raise PayloadTooLarge(f"message of {sum(wanted):,} bytes exceeds the "
                                      f"{self._max_payload:,}-byte limit")
            if external is None:
                raise NeedsData(elsewhere, wanted)
            if [len(part) for part in external] != wanted:
                raise ProtocolError("the data-plane payload does not match its layout")

        def start_check(parts: Sequence[bytes | memoryview]) -> tuple[str, Callable[[], str]]:
            return self._key.start_check(session, seq, parts)

        parts: Sequence[bytes | memoryview] = (payload,)
        try:
            if ref is not None:  # the payload is in the sender's sealed memory (``_shm``)
                if payload or self._shm is None:
                    raise ProtocolError("unexpected shared-memory reference")
                parts, (field, check) = self._shm.get(seq, ref, self._max_payload, layout, start_check)
            elif external is not None:
                parts = external
                field, check = start_check(parts)
            else:
                if layout is not None:  # the parts are checked one by one, as they were tagged
                    parts = split(payload, check_layout(layout, len(payload)))
                field, check = start_check(parts) if payload else ("", lambda: "")
        except (SharedMemoryError, ValueError) as exc:
            raise ProtocolError(str(exc)) from None
        ack = header.pop("a", None)
        if ack is not None and self._shm is not None:
            self._shm.acknowledged(int(ack))
        received: memoryview | Pickled
        if layout is None:  # one piece: in the frame, or one mapping
            received = memoryview(parts[0])
        elif ref is not None or external is not None:  # read part by part, as ``bytes``
            received = Pickled(parts[0], parts[1:])
        else:  # copied while the check runs; unpickled (by the caller) only if it passes
            received = keep(parts)
        expected = {"d": digest, "m": tag}.get(field)
        if field and (not isinstance(expected, str) or not hmac.compare_digest(check(), expected)):
            raise ProtocolError("payload does not match its signed check (tampered)")
        if not field and (digest is not None or tag is not None):
            raise ProtocolError("payload missing")
        self._seq += 1
        for name in ("s", "n", "ts"):
            header.pop(name, None)
        return Frame(header.pop("t"), header.pop("i", 0), header, received)
