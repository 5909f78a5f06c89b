"""Pickling of calls, results and exceptions, with errors that name the offending object.

Only ``loads`` unpickles, and it is only ever given payloads that ``FrameOpener`` verified.
Large ``bytes`` in a call's arguments or in a result travel out of band (``_wire.payload``):
``dumps`` returns them beside the pickle instead of copying them into it.
"""

from __future__ import annotations

import io
import marshal
import pickle
import sys
import traceback
import types
from collections import ChainMap
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from flame_asgi._base.exceptions import RemoteError, SerializationError
from flame_asgi._wire.payload import OOB_MIN, Payload, Pickled
from flame_asgi._wire.tracking import ResourceTable, reduce_tracked
from flame_asgi._wire.transfer import TransferHub, collecting_tokens, forget, receiving_through


def _reduce_code(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    try:
        return marshal.loads, (marshal.dumps(code),)
    except ValueError:  # a hand-made code object whose constants marshal refuses
        reduced: tuple[Any, tuple[Any, ...]] = cloudpickle.Pickler.dispatch_table[types.CodeType](code)
        return reduced


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no types
    """cloudpickle's Pickler, except that the code of by-value functions keeps its real file name.

    Why: since cloudpickle 3.1.3 (its PR #560, which makes pickles deterministic across notebook
    sessions), the code of every function pickled by value (closures, lambdas, nested functions,
    functions of ``__main__`` or of tests) is renamed ``<dynamic-code>``, so a remote traceback
    through user code reads ``File "<dynamic-code>", line 8`` with no source line. Our payloads
    are sent once and need not be deterministic, so code objects go through ``marshal``, the
    standard library's own format for code (that of .pyc files): it keeps ``co_filename``, the
    line table and every other field on any Python version, with no constructor signature to
    follow. The runner runs the same Python on the same source files, so ``linecache`` there
    prints the user's lines. Like the rest of a payload, this is only loaded after ``FrameOpener``
    verified it.
    """

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        if id(obj) in _BY_REFERENCE:
            return NotImplemented  # pickled by reference, as cloudpickle decides after a lookup
        return super().reducer_override(obj)


def _by_reference() -> frozenset[int]:
    """The ids of cloudpickle's own module-level functions (``_make_function``,
    ``_make_cell``, ``_function_setstate``...), which the pickle of every by-value function
    names: cloudpickle pickles them by reference, after looking up each one's module and
    name (a third of the time of a closure's ``dumps``); decided here once. Module-level
    functions live as long as their module, so no other live object has one of these ids."""
    ids = set()
    for module in {sys.modules[cloudpickle.Pickler.__module__], sys.modules[cloudpickle.__name__]}:
        for value in vars(module).values():
            if (isinstance(value, types.FunctionType) and value.__module__ == module.__name__
                    and getattr(module, value.__qualname__, None) is value):
                ids.add(id(value))
    return frozenset(ids)


_BY_REFERENCE = _by_reference()


class _TrackingPickler(_Pickler):
    """Pickles a tracked result: trackable objects are kept in ``table`` (``_tracking``)."""

    def __init__(self, file: io.BytesIO, table: ResourceTable) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._table = table

    def reducer_override(self, obj: Any) -> Any:
        reduced = reduce_tracked(self._table, obj, pickle.HIGHEST_PROTOCOL)
        return super().reducer_override(obj) if reduced is NotImplemented else reduced


def _dumps(obj: Any, resources: ResourceTable | None = None) -> bytes:
    buffer = io.BytesIO()
    if resources is None:
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    else:
        _TrackingPickler(buffer, resources).dump(obj)
    return buffer.getvalue()


class _OutOfBand:
    """Mixed into a pickler: every ``bytes`` of ``OOB_MIN`` or more, at any depth, is left out
    of the pickle as a persistent reference to ``self.buffers`` (the C pickler copies an
    exact ``bytes`` into the pickle without asking ``reducer_override``, but it asks
    ``persistent_id`` about every object). The same object met twice is one buffer, so what
    was shared arrives shared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffers: list[bytes] = []
        self._seen: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is not bytes or len(obj) < OOB_MIN:
            return None
        index = self._seen.get(id(obj))
        if index is None:
            index = self._seen[id(obj)] = len(self.buffers)
            self.buffers.append(obj)
        return index


class _OutOfBandPickler(_OutOfBand, _Pickler):
    pass


class _OutOfBandTrackingPickler(_OutOfBand, _TrackingPickler):
    pass


def _dumps_out_of_band(obj: Any, resources: ResourceTable | None) -> Payload:
    """``_dumps``, with large ``bytes`` left beside the pickle (a ``Pickled``) when a quick
    look finds one near the top (a call's arguments, a result): a pickler with
    ``persistent_id`` pays a Python call per object, which only a payload that carries
    large bytes repays. Large bytes deeper down stay in the pickle, as before."""
    if not _carries_large_bytes(obj, 3):
        return _dumps(obj, resources)
    buffer = io.BytesIO()
    pickler = (_OutOfBandPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL) if resources is None
               else _OutOfBandTrackingPickler(buffer, resources))
    pickler.dump(obj)
    return Pickled(buffer.getvalue(), pickler.buffers) if pickler.buffers else buffer.getvalue()


_SCAN = 64  # containers longer than this are not looked into (the look would cost per item)


def _carries_large_bytes(obj: Any, depth: int) -> bool:
    """Whether ``obj`` is, or holds within ``depth`` levels of short plain tuples, lists and
    dict values, a ``bytes`` of ``OOB_MIN`` or more: a call is ``(fn, args, kwargs)``, so
    three levels reach the items of a list argument."""
    kind = type(obj)
    if kind is bytes:
        return len(obj) >= OOB_MIN
    if depth == 0 or kind not in (tuple, list, dict) or len(obj) > _SCAN:
        return False
    items = obj.values() if kind is dict else obj
    return any(_carries_large_bytes(item, depth - 1) for item in items)


def dumps(obj: Any, what: str, tokens: list[str] | None = None, resources: ResourceTable | None = None) -> Payload:
    """Pickle ``obj``; on failure, raise SerializationError naming the object that failed.

    Uploads inside ``obj`` are registered for the other side to pull; their tokens are
    appended to ``tokens`` so the caller can forget them when the call ends. With
    ``resources`` (a runner's tracked result), trackable objects are kept there.
    """
    collected: list[str] = []
    try:
        with collecting_tokens(collected):
            data = _dumps_out_of_band(obj, resources)
    except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
        forget(collected)  # nothing will be sent: nobody will pull these
        with collecting_tokens(collected := []):  # the search pickles parts again
            culprit = _find_culprit(obj, what, depth=0, seen=set())
        forget(collected)
        path, bad, reason = culprit if culprit else (what, obj, exc)
        raise SerializationError(
            f"cannot send {what}: {path} ({type(bad).__module__}.{type(bad).__qualname__}) "
            f"cannot be pickled: {reason}. Create it inside the function on the runner, or "
            "pass the plain data needed to rebuild it."
        ) from exc
    if tokens is not None:
        tokens.extend(collected)
    return data


class _OutOfBandUnpickler(pickle.Unpickler):
    """Resolves the pickle's persistent ids to the payload's verified buffers, by index.

    A subclass, not an attribute set on an instance: Python 3.13 made ``persistent_load``
    read-only on ``_pickle.Unpickler`` instances.
    """

    def __init__(self, data: Pickled) -> None:
        super().__init__(io.BytesIO(data.stream))
        self._buffers = data.buffers

    def persistent_load(self, index: Any) -> Any:
        if type(index) is not int or not 0 <= index < len(self._buffers):
            # the pickle is verified, so only our own pickler wrote it: say so, not IndexError
            raise pickle.UnpicklingError(f"persistent id {index!r} names no buffer of this payload")
        return self._buffers[index]


def loads(data: bytes | memoryview | Pickled, hub: TransferHub | None = None) -> Any:
    """Unpickle a verified payload; Uploads in it become RemoteBytes read through ``hub``."""
    with receiving_through(hub):
        if isinstance(data, Pickled):
            return _OutOfBandUnpickler(data).load()
        return pickle.loads(data)


def _find_culprit(obj: Any, path: str, depth: int, seen: set[int]) -> tuple[str, Any, Exception] | None:
    """Depth-first search for the innermost part of ``obj`` that does not pickle."""
    if id(obj) in seen or depth > 8:
        return None
    seen.add(id(obj))
    try:
        _dumps(obj)
        return None
    except Exception as exc:
        for child_path, child in _children(obj, path):
            found = _find_culprit(child, child_path, depth + 1, seen)
            if found is not None:
                return found
        return path, obj, exc


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(obj, types.FunctionType):
        name = obj.__qualname__
        out: list[tuple[str, Any]] = []
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                out.append((f"closure variable {var!r} of {name}()", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        for var in _global_names(obj.__code__):
            if var in obj.__globals__:
                out.append((f"global {var!r} used by {name}()", obj.__globals__[var]))
        for i, default in enumerate(obj.__defaults__ or ()):
            out.append((f"default argument {i} of {name}()", default))
        return out
    if isinstance(obj, types.MethodType):
        return [(f"{path}.__self__", obj.__self__), (f"{path}.__func__", obj.__func__)]
    if hasattr(obj, "func") and hasattr(obj, "args") and hasattr(obj, "keywords"):  # partial
        return [(f"{path}.func", obj.func)] + [
            (f"{path} argument {i}", a) for i, a in enumerate(obj.args)
        ] + [(f"{path} keyword {k!r}", v) for k, v in obj.keywords.items()]
    if isinstance(obj, (tuple, list)):
        return [(_item_path(path, i), item) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        if path.startswith("keyword arguments of "):
            return [(f"keyword argument {k!r} of {path.removeprefix('keyword arguments of ')}", v)
                    for k, v in obj.items()]
        return [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        return [(f"{path}.{k}", v) for k, v in state.items()]
    return []


def _item_path(path: str, i: int) -> str:
    # The top-level call is pickled as (fn, args, kwargs): name those parts as a user sees them.
    if path.startswith("the call to "):
        return (path, f"argument list of {path}", f"keyword arguments of {path}")[min(i, 2)]
    if path.startswith("argument list of "):
        return f"argument {i} of {path.removeprefix('argument list of ')}"
    return f"{path}[{i}]"


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def pack_exception(exc: BaseException) -> bytes:
    """Pickle a remote exception with its traceback text; fall back to type name + text."""
    text = "".join(traceback.format_exception(exc))
    qualname = f"{type(exc).__module__}.{type(exc).__qualname__}"
    pickled: bytes | None
    try:
        pickled = _dumps(exc.with_traceback(None))
        pickle.loads(pickled)  # some exceptions pickle but cannot be rebuilt: test it here
    except Exception:
        pickled = None
    return _dumps({"type": qualname, "message": str(exc), "traceback": text, "pickled": pickled})


def unpack_exception(data: bytes | memoryview, runner_id: str) -> BaseException:
    info = loads(data)
    note = f"Remote traceback (runner {runner_id}):\n{info['traceback']}"
    if info["pickled"] is not None:
        try:
            exc = loads(info["pickled"])
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.add_note(note)
            return exc
    return RemoteError(info["message"], remote_type=info["type"], remote_traceback=info["traceback"])
