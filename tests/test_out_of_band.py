"""Large ``bytes`` travel beside the pickle (protocol 5 out of band), not inside it: what is
sent out of band, what stays in band, and that what arrives is what was sent, through every
path a payload takes (the frame itself, shared memory, a child's messages, a stream)."""

from __future__ import annotations

import io
import os
import pickle

import pytest

from flame_asgi import FlamePool, ProtocolError
from flame_asgi._wire.codec import FrameKey, FrameOpener, FrameSealer
from flame_asgi._wire.payload import OOB_MIN, Pickled
from flame_asgi._wire.pickling import dumps, loads
from tests import remote
from tests.conftest import BackendFactory

KEY = FrameKey(b"o" * 32)


def through_a_frame(obj: object) -> object:
    """``obj`` pickled, sealed into a frame (no shared memory: in the frame itself), opened
    and unpickled, as between a parent and a runner on another host."""
    sealer, opener = FrameSealer(KEY, "session", 1 << 30), FrameOpener(KEY, 1 << 30, "session")
    return loads(opener.open(sealer.seal("call", 1, dumps(obj, "a test value"))).payload)


def test_large_bytes_leave_the_pickle_without_a_copy_and_come_back_as_bytes() -> None:
    data = os.urandom(OOB_MIN)
    call = (remote.echo, (data, [data], b"small"), {"named": data, "deep": {"a": {"b": [data]}}})
    pickled = dumps(call, "the call")
    assert isinstance(pickled, Pickled)
    assert len(pickled.buffers) == 1 and pickled.buffers[0] is data  # the caller's own bytes, once
    assert len(pickled.stream) < 1000
    fn, args, kwargs = through_a_frame(call)  # type: ignore[misc]
    assert fn is remote.echo and args[0] == data and type(args[0]) is bytes
    assert args[1][0] is args[0] and kwargs["named"] is args[0]  # shared before, shared after
    assert kwargs["deep"]["a"]["b"][0] is args[0]  # at any depth, once one is found near the top
    assert args[2] == b"small"


def test_small_bytes_mutable_buffers_and_long_containers_stay_in_the_pickle() -> None:
    data = os.urandom(OOB_MIN)
    assert isinstance(dumps(b"x" * (OOB_MIN - 1), "small"), bytes)
    assert isinstance(dumps(bytearray(data), "a bytearray"), bytes)  # it must arrive writable
    arrived = through_a_frame([bytearray(data)])
    assert arrived == [bytearray(data)] and type(arrived[0]) is bytearray  # type: ignore[index]
    long = [data] + [0] * 100  # only short containers are searched: the cost would be per item
    assert isinstance(dumps(long, "a long list"), bytes) and through_a_frame(long) == long


@pytest.mark.parametrize("index", [1, -1, "0"])
def test_a_persistent_id_that_names_no_buffer_is_an_unpickling_error(index: object) -> None:
    # only our own pickler writes verified pickles, so this is a bug, never an index into
    # something else: it must say what is wrong (the unpickler is a subclass since 3.13 made
    # ``persistent_load`` read-only on instances)
    class Referring(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return index if obj == "ref" else None

    stream = io.BytesIO()
    Referring(stream, protocol=5).dump(["ref"])
    with pytest.raises(pickle.UnpicklingError, match="names no buffer"):
        loads(Pickled(stream.getvalue(), [b"only one"]))


async def test_out_of_band_payloads_cross_every_path_to_a_runner_and_back(backend: BackendFactory) -> None:
    big, other = os.urandom(3 * 1024 * 1024), os.urandom(OOB_MIN)
    async with FlamePool("oob", backend=backend(), max_concurrency=2) as pool:
        assert await pool.call(remote.echo, (big, other, big)) == (big, other, big)
        assert [item async for item in pool.stream(remote.echo_each, [big, other])] == [big, other]
        handle = await pool.place_child(remote.steer, 2)
        await handle.send(big)
        await handle.send({"other": other})
        events = [e async for e in handle]
        assert await handle == [big, {"other": other}] and events == [("got", big), ("got", {"other": other})]


class _Lying(Pickled):
    """A sender whose layout disagrees with its parts (a bug; a stranger cannot sign one)."""

    @property
    def layout(self) -> list[int]:
        return [len(self.stream), len(self) - len(self.stream) + 1]


@pytest.mark.parametrize("size", [OOB_MIN, 5 * 1024 * 1024])
def test_a_layout_that_disagrees_with_the_payload_is_refused_before_unpickling(size: int) -> None:
    pickled = dumps(os.urandom(size), "a result")
    assert isinstance(pickled, Pickled)
    frame = FrameSealer(KEY, "session", 1 << 30).seal("result", 1, _Lying(pickled.stream, pickled.buffers))
    with pytest.raises(ProtocolError, match="malformed payload layout"):
        FrameOpener(KEY, 1 << 30, "session").open(frame)
