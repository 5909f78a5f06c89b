"""The one exception tree of flame_asgi.

    FlameError
    ├── BootError            the backend could not start a runner (reason attached)
    │   ├── VersionSkew      the runner runs different code than its parent
    │   └── FlyAPIError      the Fly Machines API refused a request (status, detail)
    ├── CallTimeout          (also TimeoutError) no slot in time, or the run overran
    ├── RunnerLost           the runner died or became unreachable during the call
    ├── RemoteError          the remote code raised something that cannot be rebuilt here
    ├── SerializationError   (also TypeError) a closure, argument or result cannot be pickled
    ├── PayloadTooLarge      (also ValueError) a message exceeds the configured size limit
    ├── ProtocolError        a message failed verification (bad signature, stale, replayed)
    ├── TransferError        an Upload's source failed on the sending side, or its channel ended
    └── PoolClosed           the pool is not running (never started, or closed)

Errors of httpx, websockets and the backends' client libraries are translated into this tree at
the boundary where they happen, so callers catch one family. (``ForkUnavailable``, a
FlameError in backends/_fork_parent.py, never reaches a caller: ProcessBackend catches it and
boots a fresh interpreter instead.)
"""

from __future__ import annotations


class FlameError(Exception):
    """Root of every error flame_asgi raises."""


class BootError(FlameError):
    """A runner could not be started; ``reason`` says what the backend reported."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class VersionSkew(BootError):
    """The runner's code version differs from its parent's: it is refused."""


class FlyAPIError(BootError):
    """The Fly Machines API refused a request: ``status`` is the HTTP status, ``detail`` its error."""

    def __init__(self, message: str, *, status: int, detail: str) -> None:
        super().__init__(message, reason=f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class CallTimeout(FlameError, TimeoutError):
    """No runner slot within the caller's deadline, or the remote run overran it."""


class RunnerLost(FlameError):
    """The runner died or became unreachable while the call was in flight."""

    def __init__(self, message: str, *, runner_id: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.runner_id = runner_id
        self.reason = reason


class RemoteError(FlameError):
    """A remote exception whose type cannot be rebuilt in the caller.

    ``remote_type`` is the qualified type name, ``remote_traceback`` the formatted
    traceback from the runner.
    """

    def __init__(self, message: str, *, remote_type: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.args[0]}" if self.args else self.remote_type


class SerializationError(FlameError, TypeError):
    """Something that must cross to or from a runner cannot be pickled."""


class PayloadTooLarge(FlameError, ValueError):
    """A message is larger than the channel accepts (``FLAME_MAX_PAYLOAD``)."""


class ProtocolError(FlameError):
    """A message failed verification and was dropped without being unpickled."""


class TransferError(FlameError):
    """A transfer failed on the sending side (its source raised) or its channel ended."""


class PoolClosed(FlameError):
    """The pool is not running: start it (``async with pool``) or register it on an app."""
