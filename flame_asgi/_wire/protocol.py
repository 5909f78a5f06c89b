"""The messages between a parent and one runner: who sends what, and when.

Every message is one signed frame (``_codec``): a type, the id of the work it belongs to
(0 for the session itself) and a few header fields, plus an optional pickled payload.
The types are ``Literal`` aliases here, so that mypy refuses a misspelt one wherever a
frame is sent or a reply is told apart.

Session (id 0)
  parent -> runner  ``hello`` first (``runner`` id, code version ``v``, the shared-memory
                    probe ``pr`` and the parent's beacon ``lv`` on one host): it fixes the session.
  runner -> parent  ``ready`` (``pid``, ``v``, ``shm``, the runner's beacon ``lv``), or
                    ``refused`` (``reason``: version skew).
  both ways         ``ping`` every heartbeat interval; any frame shows the peer is alive.
                    Over loopback with both beacons, an idle channel sends none: the
                    peer's beacon shows it (``_wire.liveness``); a side with something in
                    flight pings with ``r`` (answer me), which the other answers at once.
                    A ``ping`` with ``nb`` (parent -> runner): the parent could not read
                    the runner's beacon, so the runner pings as without one.
  parent -> runner  ``stop``: wind down (linked work is cancelled, unlinked work finishes).
  runner -> parent  ``recycle`` (``reason``): replace this runner (a cancelled thread would
                    not stop).

Work (id chosen by the parent, one per call, cast, stream or child)
  parent -> runner  ``call``: the payload is the pickled ``(fn, args, kwargs)``; ``k`` is
                    its ``WorkKind``, ``l`` link, ``p`` whether progress is wanted, ``w`` the
                    credit window, ``tc`` the caller's trace context, ``tr`` whether the
                    resources in the result are tracked (``_tracking``).
  runner -> parent  ``event`` (a ``report()``) and ``item`` (a stream's next value), each
                    spending one credit; then exactly one terminal reply: ``result`` (the
                    return value), ``end`` (a stream finished), ``error`` (the exception)
                    or ``cancelled`` (stopped on request).
  parent -> runner  ``credit`` (``c``: that many events or items consumed), ``cancel``.
  parent -> runner  ``message`` (a child's): the payload is what ``handle.send`` sent;
                    the parent sends at most ``MESSAGE_WINDOW`` unacknowledged ones.
  runner -> parent  ``credit`` (``c``: that many messages taken by ``receive()``).

Tracked resources (id 0, ``x`` the resource's token)
  parent -> runner  ``release``: the parent is done with a tracked object of a result.

Transfers (id 0, ``x`` the Upload's token; either way, see ``_transfer``)
  reader -> source  ``pull`` (``c`` more chunks), ``drop`` (stopped reading early).
  source -> reader  ``chunk`` (data), then ``eof`` (``size``) or ``abort`` (``e`` why, ``big``
                    when over its limit).

Received frame types stay plain ``str`` until one of the ``is_*`` guards below narrows
them: a type this version does not know is ignored, not an error.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, TypeGuard, get_args

from flame_asgi._wire.payload import Payload

WorkKind = Literal["call", "cast", "stream", "child"]
Credited = Literal["event", "item"]  # each spends one credit of the caller's window
Terminal = Literal["result", "end", "error", "cancelled"]
WorkReply = Literal[Credited, Terminal]  # frames a runner sends about one piece of work
Reply = Literal[WorkReply, "lost"]  # what the parent's RemoteCall yields: "lost" is its own, never sent
TransferAnswer = Literal["chunk", "eof", "abort"]  # a source's frames
Transfer = Literal["pull", "drop", TransferAnswer]
ToRunner = Literal["hello", "call", "credit", "cancel", "message", "release", "ping", "stop", Transfer]
ToParent = Literal["ready", "refused", "ping", "recycle", "credit", WorkReply, Transfer]
FrameType = Literal[ToRunner, ToParent]

MESSAGE_WINDOW = 16  # messages to a child in flight, not yet taken by receive()
CALL_WINDOW = 32  # progress events / stream items of one call in flight, not yet consumed

WORK_KINDS: frozenset[str] = frozenset(get_args(WorkKind))
CREDITED: frozenset[str] = frozenset(get_args(Credited))
TERMINAL: frozenset[str] = frozenset(get_args(Terminal))
WORK_REPLIES: frozenset[str] = frozenset(get_args(WorkReply))
TRANSFER: frozenset[str] = frozenset(get_args(Transfer))
TO_RUNNER: frozenset[str] = frozenset(get_args(ToRunner))


class SendFrame(Protocol):
    """Sends one frame on a channel end (``RunnerConnection._send``, ``RunnerSession.send``)."""

    async def __call__(self, type_: FrameType, id_: int = 0, payload: Payload = b"", **meta: Any) -> None: ...


def is_work_kind(value: object) -> TypeGuard[WorkKind]:
    return value in WORK_KINDS


def is_work_reply(type_: str) -> TypeGuard[WorkReply]:
    return type_ in WORK_REPLIES


def is_transfer(type_: str) -> TypeGuard[Transfer]:
    return type_ in TRANSFER


def is_to_runner(type_: str) -> TypeGuard[ToRunner]:
    return type_ in TO_RUNNER
