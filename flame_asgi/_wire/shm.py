"""Large payloads between a parent and a runner on the same host, through sealed memory.

Over a WebSocket, 100 MB crosses a dozen buffers (frames, masking, reassembly, socket
copies). Between processes of one host it need not: the sender writes the payload once
into a ``memfd`` (anonymous memory), *seals* it (``F_SEAL_WRITE``, ``F_SEAL_SHRINK``,
``F_SEAL_GROW``, ``F_SEAL_SEAL``: from then on the kernel refuses every change, through
any descriptor or mapping), and sends a signed frame naming it: the sender's pid, the
descriptor number, the file's inode and its size, with the SHA-256 of the payload as
every frame has. The receiver opens ``/proc/<pid>/fd/<fd>``, checks that it is that inode,
that size and sealed, maps it read-only and checks the digest over the mapping before
anything is unpickled, exactly as for a payload that came in the frame. The content
cannot change after that check: the seals forbid it.

Who may do what: only a frame signed with the channel's key can name a memfd, so a
stranger cannot make a runner open anything. A process of the same user could open the
sender's memfd through ``/proc`` before it is sealed and write into it; the receiver's
digest check then fails and the session ends: it can cost a session, never run code.

Lifetime: the receiver's mapping lives as long as the payload's ``memoryview`` (until it
is unpickled and dropped). The sender keeps its descriptor until the receiver
acknowledges the frame (field ``a`` of its next frame, a heartbeat at the latest) or the
session ends, then closes it; the kernel frees the memory when both are gone.

Whether the peer can read our memfds (same host, same pid namespace, same user) is
found out once, at the handshake, with a probe (``probe``/``check_probe``); if not, every
payload travels in its frame as before.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from typing import Any

from flame_asgi._wire.payload import check_layout, split

SHM_MIN = 256 * 1024  # payloads from this size go through shared memory
OVERLAP_MIN = 4 * 1024 * 1024  # payloads from this size are checked from a mapping while they are read
# Begins the check of a payload's parts: (its header field, a call that returns the check).
StartCheck = Callable[[Sequence[bytes | memoryview]], tuple[str, Callable[[], str]]]
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_AVAILABLE = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
log = logging.getLogger("flame_asgi.wire")


class SharedMemoryError(Exception):
    """A named memfd could not be opened or is not what the signed frame said."""


class SharedMemory:
    """One channel end's shared-memory state: the memfds it sent and has not seen
    acknowledged, and the highest sequence number it received through one."""

    def __init__(self) -> None:
        self.enabled = False  # set once the handshake showed the peer can read our memfds
        self._sent: dict[int, int] = {}  # our frame's sequence number -> its memfd
        self._received = 0  # highest frame of the peer's that came through a memfd, unacknowledged

    # -- sending ----------------------------------------------------------------------
    def wants(self, size: int) -> bool:
        return self.enabled and size >= SHM_MIN

    def put(self, seq: int, parts: Sequence[bytes | memoryview]) -> dict[str, int] | None:
        """Write ``parts`` end to end to a new sealed memfd; return the reference for the
        frame header, or None if the kernel would not make one (the payload then travels in
        its frame: slower, never lost)."""
        try:
            fd = _sealed(*parts)
        except OSError as exc:
            # Seen in CI: ``F_ADD_SEALS`` failing with EBUSY on a memfd nothing had mapped,
            # when the kernel still counted extra references on its pages after waiting for
            # them (it does so ~150 ms: transparent huge pages for shmem, pages still in
            # another CPU's LRU batch). Also EMFILE, ENOMEM. None of it is the payload's fault.
            log.info("shared memory refused a %s-byte payload (%s); it goes in its frame",
                     f"{sum(len(p) for p in parts):,}", exc.strerror or exc)
            return None
        self._sent[seq] = fd
        st = os.fstat(fd)
        return {"pid": os.getpid(), "fd": fd, "ino": st.st_ino, "n": st.st_size}

    def acknowledged(self, seq: int) -> None:
        """The peer has opened our frames up to ``seq``: their memfds can go."""
        for done in [s for s in self._sent if s <= seq]:
            os.close(self._sent.pop(done))

    @property
    def owes_ack(self) -> bool:
        """A payload of the peer's came through a memfd and our frames have not said so yet."""
        return self._received != 0

    def take_ack(self) -> int:
        """The acknowledgement to put in our next frame (0: none due)."""
        seq, self._received = self._received, 0
        return seq

    # -- receiving --------------------------------------------------------------------
    def get(self, seq: int, ref: Any, max_size: int, layout: Any,
            start_check: StartCheck) -> tuple[list[memoryview] | list[bytes], tuple[str, Callable[[], str]]]:
        """The payload in the memfd a verified frame names, after checking it is the one it
        names, and its check (``start_check``'s, begun on it). In one piece: mapped, as one
        view. Sent out of band: read part by part as ``bytes`` along its ``layout``, the
        objects the unpickler hands on (one copy, where a mapping costs the unpickler a copy
        and page faults besides)."""
        try:
            pid, fd, ino, size = (int(ref[k]) for k in ("pid", "fd", "ino", "n"))
        except (TypeError, KeyError, ValueError):
            raise SharedMemoryError("malformed shared-memory reference") from None
        if not 0 < size <= max_size:
            raise SharedMemoryError(f"shared-memory payload of {size:,} bytes is out of bounds")
        if layout is None:
            view = _map(pid, fd, ino, size)
            result: tuple[list[memoryview] | list[bytes], tuple[str, Callable[[], str]]] = (
                [view], start_check([view]))
        else:
            try:
                layout = check_layout(layout, size)
            except ValueError as exc:
                raise SharedMemoryError(str(exc)) from None
            result = _read(pid, fd, ino, size, layout, start_check)
        self._received = max(self._received, seq)
        return result

    def close(self) -> None:
        for fd in self._sent.values():
            os.close(fd)
        self._sent.clear()


def probe() -> tuple[int, dict[str, Any]] | None:
    """A small sealed memfd for the peer to read at the handshake: (fd to close, reference);
    None if the kernel would not make one (then no payload goes through shared memory)."""
    secret = secrets.token_bytes(16)
    try:
        fd = _sealed(secret)
    except OSError as exc:
        log.info("no shared memory for this channel: the kernel refused a sealed memfd (%s)", exc.strerror or exc)
        return None
    return fd, {"pid": os.getpid(), "fd": fd, "ino": os.fstat(fd).st_ino, "n": len(secret), "x": secret.hex()}


def check_probe(ref: Any) -> bool:
    """Can this process read the peer's memfds? (Same host, same pid namespace, same user.)"""
    if not _AVAILABLE or not isinstance(ref, dict):
        return False
    try:
        view = _map(int(ref["pid"]), int(ref["fd"]), int(ref["ino"]), int(ref["n"]))
        return bytes(view) == bytes.fromhex(str(ref["x"]))
    except (SharedMemoryError, KeyError, TypeError, ValueError):
        return False


def available() -> bool:
    return _AVAILABLE


def _sealed(*parts: bytes | memoryview) -> int:
    fd = os.memfd_create("flame-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open(pid: int, fd: int, ino: int, size: int) -> int:
    """Our own descriptor of the sender's memfd, once it is shown to be the sealed file the
    frame was signed for."""
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SharedMemoryError(f"cannot open the sender's shared memory ({exc.strerror})") from None
    try:
        st = os.fstat(mine)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or st.st_size != size:
            raise SharedMemoryError("the named shared memory is not the one the frame was signed for")
        if fcntl.fcntl(mine, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise SharedMemoryError("the named shared memory is not sealed against changes")
    except BaseException:
        os.close(mine)
        raise
    return mine


def _map(pid: int, fd: int, ino: int, size: int) -> memoryview:
    mine = _open(pid, fd, ino, size)
    try:
        return memoryview(mmap.mmap(mine, size, prot=mmap.PROT_READ))
    except OSError as exc:
        raise SharedMemoryError(f"cannot map the sender's shared memory ({exc.strerror})") from None
    finally:
        os.close(mine)


def _read(pid: int, fd: int, ino: int, size: int, layout: list[int],
          start_check: StartCheck) -> tuple[list[bytes], tuple[str, Callable[[], str]]]:
    mine = _open(pid, fd, ino, size)
    try:
        check = None
        if size >= OVERLAP_MIN:
            # Checked through a mapping on the check's thread while this one copies: both
            # read the same pages, which the seals keep from changing.
            mapping = memoryview(mmap.mmap(mine, size, prot=mmap.PROT_READ))
            check = start_check(split(mapping, layout))
        parts = []
        offset = 0
        for n in layout:
            part = os.pread(mine, n, offset)
            if len(part) != n:  # a sealed file cannot shrink: only a bad layout gets here
                raise SharedMemoryError("the named shared memory is shorter than its layout")
            parts.append(part)
            offset += n
        return parts, check or start_check(parts)
    except OSError as exc:
        raise SharedMemoryError(f"cannot read the sender's shared memory ({exc.strerror})") from None
    finally:
        os.close(mine)
