"""ProcessBackend details that the pool scenarios do not show."""

from __future__ import annotations

from flame_asgi import FlamePool, ProcessBackend
from tests import remote


async def test_a_fractional_stop_timeout_is_rounded_up_for_uvicorn() -> None:
    # uvicorn's graceful shutdown takes whole seconds: 1.5 s must give the runner 2, not 1.
    async with FlamePool("grace", backend=ProcessBackend(fork=False, stop_timeout=1.5)) as pool:
        pid = await pool.call(remote.pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[argv.index(b"--graceful") + 1] == b"2"


async def test_a_runners_subprocesses_do_not_inherit_its_listening_socket() -> None:
    async with FlamePool("fds", backend=ProcessBackend()) as pool:
        held = await pool.call(remote.subprocess_fds)
    assert not [fd for fd in held if fd.startswith("socket:")], held
