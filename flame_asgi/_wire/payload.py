"""A pickled payload whose large ``bytes`` travel beside the pickle, not inside it.

The pickle leaves each large ``bytes`` out as a persistent reference (``_wire.pickling``),
and the bytes themselves are handed over beside it ("out of band"). That saves a whole
copy on the sender (the pickle no longer contains them) and lets the receiver hand the
unpickler ``bytes`` objects it read straight from the sender's memory (``_shm``) or from
the frame. ``Pickled`` is that pair: the pickle (``stream``) and its buffers, written one
after the other. Its ``layout`` (every part's length) goes in the frame's signed header,
and the check covers every part, so the receiver checks the whole payload before anything
is unpickled, exactly as for a payload that is one piece.
"""

from __future__ import annotations

from collections.abc import Sequence

OOB_MIN = 64 * 1024  # bytes from this size travel out of band
MAX_PARTS = 1 + 65_536  # a layout longer than this is refused as malformed


class Pickled:
    """A pickle and the ``bytes`` it refers to by index (its persistent ids), in that order."""

    __slots__ = ("_size", "buffers", "stream")

    def __init__(self, stream: bytes | memoryview, buffers: Sequence[bytes | memoryview]) -> None:
        self.stream = stream
        self.buffers = tuple(buffers)
        self._size = len(stream) + sum(len(b) for b in self.buffers)

    @property
    def parts(self) -> tuple[bytes | memoryview, ...]:
        return (self.stream, *self.buffers)

    @property
    def layout(self) -> list[int]:
        """The length of every part: what the receiver needs to cut the parts apart again."""
        return [len(part) for part in self.parts]

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __repr__(self) -> str:
        return f"<Pickled {self._size:,} bytes in {len(self.buffers) + 1} parts>"


Payload = bytes | Pickled  # what a frame carries: one piece, or a pickle and its buffers


def parts_of(payload: Payload | memoryview) -> tuple[bytes | memoryview, ...]:
    return payload.parts if isinstance(payload, Pickled) else (payload,)


def check_layout(layout: object, size: int) -> list[int]:
    """A signed header's layout, checked against the payload's size (``ValueError`` if not)."""
    if (not isinstance(layout, list) or not 2 <= len(layout) <= MAX_PARTS
            or not all(type(n) is int and n >= 0 for n in layout) or sum(layout) != size):
        raise ValueError("malformed payload layout")
    return layout


def split(view: memoryview, layout: list[int]) -> list[memoryview]:
    """The parts of a payload that arrived in one piece, as views into it."""
    parts = []
    pos = 0
    for n in layout:
        parts.append(view[pos:pos + n])
        pos += n
    return parts


def keep(parts: Sequence[bytes | memoryview]) -> Pickled:
    """A verified payload's parts as the unpickler takes them: the pickle as a view, each
    buffer as the ``bytes`` object the unpickler hands on (one copy, as in band)."""
    return Pickled(parts[0], [bytes(part) for part in parts[1:]])
