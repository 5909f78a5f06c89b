"""Remote tracebacks through code pickled by value name the user's file, line and source line.

cloudpickle 3.1.3 renames such code ``<dynamic-code>``; flame_asgi._wire.pickling keeps the real name.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import types
from collections.abc import Callable
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest

from flame_asgi import FlamePool
from flame_asgi._wire import pickling
from flame_asgi._wire.pickling import dumps, loads
from tests.conftest import BackendFactory

HERE = pathlib.Path(__file__)


def _line_of(source: str) -> int:
    """The number of the one line of this file that is exactly ``source`` (indentation aside)."""
    found = [n for n, line in enumerate(HERE.read_text().splitlines(), 1) if line.strip() == source]
    assert len(found) == 1, f"{source!r} is on lines {found}"
    return found[0]


def _remote_note(raised: BaseException) -> str:
    every: list[str] = getattr(raised, "__notes__", [])
    notes = [note for note in every if note.startswith("Remote traceback")]
    assert len(notes) == 1, every
    return notes[0]


def _assert_frame(note: str, function: str, source: str) -> None:
    assert "<dynamic-code>" not in note
    assert f'File "{HERE}", line {_line_of(source)}, in {function}\n    {source}\n' in note, note


async def test_a_failing_closure_names_its_file_line_and_source(backend: BackendFactory) -> None:
    limit = 3

    def check(value: int) -> int:
        if value > limit:
            raise ValueError(f"{value} is over {limit}")
        return value

    async with FlamePool("pickling-closure", backend=backend()) as pool:
        assert await pool.call(check, 2) == 2
        with pytest.raises(ValueError, match="5 is over 3") as raised:
            await pool.call(check, 5)
    _assert_frame(_remote_note(raised.value), "check", 'raise ValueError(f"{value} is over {limit}")')


async def test_a_failing_nested_function_names_every_frame(backend: BackendFactory) -> None:
    def outer(values: list[int]) -> float:
        def mean(xs: list[int]) -> float:
            return sum(xs) / len(xs)

        return mean(values) * 2

    async with FlamePool("pickling-nested", backend=backend()) as pool:
        with pytest.raises(ZeroDivisionError) as raised:
            await pool.call(outer, [])
    note = _remote_note(raised.value)
    _assert_frame(note, "outer", "return mean(values) * 2")
    _assert_frame(note, "mean", "return sum(xs) / len(xs)")


async def test_a_failing_lambda_names_its_line(backend: BackendFactory) -> None:
    table: dict[str, int] = {}

    async with FlamePool("pickling-lambda", backend=backend()) as pool:
        with pytest.raises(KeyError) as raised:
            await pool.call(lambda key: table[key], "missing")
    _assert_frame(_remote_note(raised.value), "<lambda>", 'await pool.call(lambda key: table[key], "missing")')


def _code_fields(code: types.CodeType) -> tuple[Any, ...]:
    nested = tuple(_code_fields(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return (code.co_filename, code.co_qualname, code.co_firstlineno, code.co_linetable, list(code.co_positions()),
            nested)


def test_code_pickled_by_value_keeps_file_and_line_table() -> None:
    def outer() -> Callable[[], int]:
        def inner() -> int:
            return 1

        return inner

    loaded = loads(dumps(outer, "a function"))
    assert loaded is not outer
    assert _code_fields(loaded.__code__) == _code_fields(outer.__code__)
    assert loaded.__code__.co_filename == str(HERE)
    assert loaded()() == 1


def test_code_that_marshal_refuses_still_pickles() -> None:
    def answer() -> int:
        return 42

    # A hand-made code object with a constant marshal cannot write falls back to cloudpickle's reduction.
    answer.__code__ = answer.__code__.replace(co_consts=(*answer.__code__.co_consts, frozenset({range(3)})))
    loaded = loads(dumps(answer, "a function"))
    assert loaded() == 42
    assert loaded.__code__.co_consts[-1] == frozenset({range(3)})


def test_cloudpickles_own_helpers_are_pickled_by_reference_as_cloudpickle_would() -> None:
    # _Pickler decides once that cloudpickle's module-level helpers (named in every by-value
    # function's pickle) go by reference; cloudpickle decides so per object. Same bytes.
    class EveryTime(pickling._Pickler):  # type: ignore[misc]
        reducer_override = cloudpickle.Pickler.reducer_override

    counter = [0]

    def closure(step: int = 1) -> int:
        counter[0] += step
        return counter[0]

    for obj in (closure, lambda: closure, (closure, (2,), {"step": 3}), cloudpickle.cloudpickle._make_cell):
        ours, theirs = io.BytesIO(), io.BytesIO()
        pickling._Pickler(ours, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        EveryTime(theirs, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        assert ours.getvalue() == theirs.getvalue()
    assert id(cloudpickle.cloudpickle._make_function) in pickling._BY_REFERENCE
    assert loads(dumps(closure, "a closure"))(5) == 5  # its own copy of the counter
