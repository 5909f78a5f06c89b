"""Tracked resources (FLAME's ``Trackable``): a result that holds something living on its
runner keeps that runner up until the parent is done with it.

``call(..., track_resources=True)`` marks the call. On the runner, the result is pickled
with every *trackable* object in it (one whose class defines ``__flame_release__``) kept
in the session's ``ResourceTable`` under a token; ``Upload``s in it stay registered until
pulled. In the parent, each ``RemoteBytes`` and trackable found while unpickling takes a
hold on the runner (idle shutdown and ``single_use`` wait for it), released when:

- a ``RemoteBytes`` has been read to its end (or failed);
- ``release(obj)`` is called;
- the parent drops its last reference to the object (garbage collection).

Releasing a trackable sends ``release`` to the runner, which calls the object's
``__flame_release__()`` there (sync or async). When the parent goes away, the runner
releases everything it still holds as its session winds down.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import secrets
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger("flame_asgi.tracking")


@runtime_checkable
class Trackable(Protocol):
    """A result object holding something that lives on the runner (a temp dir, a process, a
    model in memory). Returned from ``call(..., track_resources=True)``, it keeps its runner
    up until the parent releases it; ``__flame_release__`` then runs on the runner, where
    it frees what the object holds. The class must allow weak references (plain classes do)."""

    def __flame_release__(self) -> Any: ...


# -- runner side ------------------------------------------------------------------------
class ResourceTable:
    """Trackable objects a runner returned and keeps alive for its parent: token -> object."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def keep(self, obj: Any) -> str:
        token = secrets.token_hex(12)
        self._objects[token] = obj
        return token

    async def release(self, token: str) -> None:
        obj = self._objects.pop(token, None)
        if obj is not None:
            await _release_one(obj)

    async def release_all(self) -> None:
        objects, self._objects = self._objects, {}
        for obj in objects.values():
            await _release_one(obj)


async def _release_one(obj: Any) -> None:
    try:
        release = obj.__flame_release__
        result = release() if inspect.iscoroutinefunction(release) else await asyncio.to_thread(release)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("__flame_release__ of %s raised", type(obj).__qualname__)


def reduce_tracked(table: ResourceTable, obj: Any, protocol: int) -> Any:
    """The pickler's reduction of a trackable ``obj``: its own, wrapped so that the parent
    learns the token it is kept under. ``NotImplemented`` for anything else."""
    if isinstance(obj, type) or not hasattr(type(obj), "__flame_release__"):
        return NotImplemented
    reduced = obj.__reduce_ex__(protocol)
    if not isinstance(reduced, tuple):
        return NotImplemented
    return (_tracked, (table.keep(obj), reduced[0], reduced[1]), *reduced[2:])


# -- parent side ------------------------------------------------------------------------
Let = Literal["drop", "release"]  # the frame that lets the runner free a resource


class Teller(Protocol):
    """Where a release is told: the channel end the result came through (a ``TransferHub``)."""

    async def tell(self, type_: Let, token: str) -> None: ...


_found: contextvars.ContextVar[list[tuple[Let, str, Any]] | None] = contextvars.ContextVar(
    "flame_tracked_found", default=None)
# id(object) -> its finalizer, for release(obj): ids, because user objects need not be hashable.
_finalizers: dict[int, weakref.finalize[Any, Any]] = {}


def _tracked(token: str, rebuild: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    obj = rebuild(*args)
    noticed("release", token, obj)
    return obj


def noticed(frame: Let, token: str, obj: Any) -> None:
    """While unpickling a tracked result: ``obj`` is a resource the runner keeps under
    ``token``; ``frame`` is what tells the runner it may let it go."""
    found = _found.get()
    if found is not None:
        found.append((frame, token, obj))


def track(load: Callable[[Any, Any], Any], data: Any, hub: Teller,
          hold: Callable[[], Callable[[], None]]) -> Any:
    """Unpickle a tracked result; every resource in it takes a hold (``hold()`` returns the
    hold's release) that ends when the resource is read, released or dropped."""
    found: list[tuple[Let, str, Any]] = []
    reset = _found.set(found)
    try:
        result = load(data, hub)
    finally:
        _found.reset(reset)
    loop = asyncio.get_running_loop()
    for frame, token, obj in found:
        unhold = hold()
        key = id(obj)
        try:
            fin = weakref.finalize(obj, _let_go, key, loop, hub, frame, token, unhold)
        except TypeError:
            log.warning("%s cannot be weakly referenced: its runner stays up until release() is called on it",
                        type(obj).__qualname__)
            fin = _Manual(_let_go, key, loop, hub, frame, token, unhold)  # type: ignore[assignment]
        _finalizers[key] = fin
        if hasattr(obj, "_on_end"):  # a RemoteBytes: reading it to the end releases it too
            obj._on_end = fin
    return result


def release(resource: Any) -> None:
    """Tell the runner the parent is done with ``resource`` (a ``RemoteBytes`` or a
    trackable object from a ``track_resources=True`` call), so the runner may stop.

    Dropping the last reference does the same, later; releasing twice does nothing.
    """
    fin = _finalizers.pop(id(resource), None)
    if fin is not None:
        fin()


class _Manual:
    """A finalizer for objects that cannot be weakly referenced: runs once, when called."""

    def __init__(self, fn: Callable[..., None], *args: Any) -> None:
        self._fn: Callable[..., None] | None = fn
        self._args = args

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn(*self._args)


def _let_go(key: int, loop: asyncio.AbstractEventLoop, hub: Teller, frame: Let,
            token: str, unhold: Callable[[], None]) -> None:
    # Runs while the object is released or dies (so its id cannot have been reused yet):
    # in any thread, or on the loop itself. The frame and the hold's end belong to the loop.
    _finalizers.pop(key, None)

    def on_loop() -> None:
        unhold()
        loop.create_task(hub.tell(frame, token))

    try:
        loop.call_soon_threadsafe(on_loop)
    except RuntimeError:  # the loop has closed: its pool and runners are gone already
        pass
