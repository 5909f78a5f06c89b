"""Functions the tests run on runners. They live in an importable module so that a
ProcessBackend runner (a separate interpreter) unpickles them by reference."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from flame_asgi import LocalBackend, parent, report


def works() -> str:
    return "works"


def square(x: int) -> int:
    return x * x


async def hold(gate: str, started: str | None = None) -> str:
    """Mark that the work started, then wait (cancellably) until ``gate`` exists."""
    if started:
        pathlib.Path(started).touch()
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    return "held"


async def sleep_then_touch(seconds: float, path: str) -> str:
    await asyncio.sleep(seconds)
    pathlib.Path(path).touch()
    return "slept"


def touch(path: str) -> str:
    pathlib.Path(path).touch()
    return "touched"


def touch_then_raise(path: str) -> None:
    pathlib.Path(path).touch()
    raise ValueError("boom")


def raise_value_error() -> None:
    raise ValueError("remote boom")


def die() -> None:
    """End this runner abruptly, as a crash or an OOM kill would."""
    info = parent()
    assert info is not None
    if info.backend == "local":
        LocalBackend.kill_current("killed by test")
        time.sleep(0.2)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def runner_id() -> str:
    info = parent()
    assert info is not None
    return info.runner_id


def count_up(n: int) -> Iterator[int]:
    yield from range(n)


async def acount_up(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def produce_logged(n: int, log: str) -> Iterator[int]:
    """Yield n items, recording how many were produced so far (for back-pressure tests)."""
    for i in range(n):
        pathlib.Path(log).write_text(str(i + 1))
        yield i


def report_steps(n: int) -> str:
    for i in range(n):
        report({"step": i})
    return "reported"


async def areport_steps(n: int) -> str:
    for i in range(n):
        await report({"step": i})
    return "reported"


def report_logged(n: int, log: str) -> str:
    for i in range(n):
        report(i)
        pathlib.Path(log).write_text(str(i + 1))
    return "reported"


def sync_spin(seconds: float, path: str) -> str:
    """Pure-Python busy loop (interruptible between bytecodes), then touch ``path``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    pathlib.Path(path).touch()
    return "spun"


def env_var(name: str) -> str | None:
    return os.environ.get(name)


def pid() -> int:
    return os.getpid()


def runner_id_after(seconds: float) -> str:
    """Sleep, then name the runner this ran on."""
    time.sleep(seconds)
    info = parent()
    return info.runner_id if info is not None else "not on a runner"


async def digest_upload(data: Any) -> tuple[int, str]:
    """Read a RemoteBytes chunk by chunk; return its size and SHA-256."""
    import hashlib

    h = hashlib.sha256()
    n = 0
    async for chunk in data:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


_KEPT: list[Any] = []


def keep(data: Any) -> str:
    """Hold on to ``data`` (a RemoteBytes, say) after the call returns; say what it is."""
    _KEPT.append(data)
    return type(data).__name__


def digest_upload_sync(data: Any) -> tuple[int, str]:
    import hashlib

    h = hashlib.sha256()
    n = 0
    for chunk in data:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def make_file(path: str, megabytes: int) -> Any:
    """Write a file on the runner and send it back as an Upload."""
    from flame_asgi import Upload

    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
    return Upload(path)


def meet(folder: str, index: int, expected: int) -> int:
    """Sync and blocking: mark arrival, then wait (sleeping) until ``expected`` calls arrived.
    Only succeeds if that many sync calls run side by side on the runner."""
    pathlib.Path(folder, str(index)).touch()
    deadline = time.monotonic() + 20
    while len(os.listdir(folder)) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {expected} calls ran at once")
        time.sleep(0.01)
    return index


def count_with_progress(n: int) -> Iterator[int]:
    for i in range(n):
        report(f"making {i}")
        yield i


# -- parity (tests/test_parity.py) ------------------------------------------------------
def add(a: int, b: int = 0, *, c: int = 0) -> int:
    return a + b + c


async def aadd(a: int, *, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def kw_count(n: int, *, step: int) -> Iterator[int]:
    yield from range(0, n, step)


def die_once(marker: str) -> str:
    """Kill this runner the first time (as a crash would); succeed on the retry."""
    if not os.path.exists(marker):
        pathlib.Path(marker).touch()
        die()
    return "survived"


def record_run(log: str, value: int) -> int:
    """Append ``start value`` to ``log`` (one line per execution), then return ``value``."""
    with open(log, "a") as f:
        f.write(f"{value} {time.time()!r}\n")
    return value


def attempt_then_raise(path: str) -> None:
    with open(path, "a") as f:
        f.write("x")
    raise ValueError("user error: not retried")


def fail_on(value: int, bad: int) -> int:
    if value == bad:
        raise ValueError(f"bad item {value}")
    return value


async def slow_square(value: int, delay: float) -> int:
    await asyncio.sleep(delay)
    return value * value


async def gated_square(value: int, gate: str, started_dir: str) -> int:
    pathlib.Path(started_dir, str(value)).touch()
    while not os.path.exists(gate):
        await asyncio.sleep(0.01)
    return value * value


async def steer(count: int) -> list[Any]:
    """A child steered by its parent: report each message taken, return them all."""
    from flame_asgi import receive

    got = []
    for _ in range(count):
        message = await receive()
        got.append(message)
        await report(("got", message))
    return got


def steer_sync(count: int) -> list[Any]:
    """The same in a sync function (a worker thread): ``receive()`` blocks there."""
    from flame_asgi import receive

    got = []
    for _ in range(count):
        message = receive()
        got.append(message)
        report(("got", message))
    return got


async def poll_once() -> str:
    from flame_asgi import receive

    try:
        await receive(timeout=0)
    except TimeoutError:
        return "nothing yet"
    return "something"


async def receive_outside_child() -> str:
    from flame_asgi import receive

    try:
        await receive()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


class Scratch:
    """A file made on the runner, deleted there when the parent releases it (a trackable)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __flame_release__(self) -> None:
        os.remove(self.path)


def make_scratch(directory: str, name: str) -> Scratch:
    path = os.path.join(directory, name)
    pathlib.Path(path).write_text("scratch")
    return Scratch(path)


def make_bytes(size: int) -> dict[str, Any]:
    from flame_asgi import Upload

    return {"data": Upload(b"x" * size), "size": size}


def file_exists(path: str) -> bool:
    return os.path.exists(path)


def broken_predicate() -> bool:
    raise RuntimeError("predicate broke")


def echo(data: bytes) -> bytes:
    return data


def echo_each(items: list[Any]) -> Iterator[Any]:
    yield from items


def raise_after_receiving(data: bytes) -> None:
    raise ValueError(f"remote boom after {len(data)} bytes")


async def subprocess_fds() -> list[str]:
    """What a subprocess of this runner holds open (ffmpeg, say, started by the app)."""
    proc = await asyncio.create_subprocess_exec("sleep", "5")
    try:
        for _ in range(100):  # until it has exec'd
            if os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
                break
            await asyncio.sleep(0.01)
        # The kernel points /proc/PID/exe at the new program before it closes the
        # close-on-exec descriptors: one listed now may be gone a moment later. Those were
        # never inherited, so read until two listings agree, skipping any that vanish.
        held: list[str] | None = None
        for _ in range(100):
            now = []
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                try:
                    now.append(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
                except FileNotFoundError:
                    continue
            if now == held:
                break
            held = now
            await asyncio.sleep(0.01)
        return now
    finally:
        proc.kill()
        await proc.wait()


def raise_runner_lost(path: str) -> None:
    """A function whose own call to some other pool lost its runner: its error, not ours."""
    from flame_asgi import RunnerLost

    with open(path, "a") as f:
        f.write("x")
    raise RunnerLost("a runner of another pool was lost", runner_id="elsewhere")
