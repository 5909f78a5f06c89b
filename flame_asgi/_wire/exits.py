"""How a runner ended: ``ExitReason``, as its backend saw it, and the label metrics give it.

Backends build these (each knows its platform's exit statuses); the parent's channel asks
its backend for one when the channel is lost, and labels the loss with ``loss_label``.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Literal

ExitKind = Literal["oom", "signal", "exit", "gone", "unreachable"]


@dataclasses.dataclass(frozen=True)
class ExitReason:
    """How a runner ended, as its backend saw it.

    ``kind`` is a stable word for metrics and code: ``oom`` (killed for memory), ``signal``
    (killed by ``signal``), ``exit`` (its process exited with ``code``), ``gone`` (it
    vanished: deleted, destroyed, its exit status lost), ``unreachable`` (still running as
    far as the backend knows, but its channel is gone). ``detail`` is the sentence users
    read; rewording it changes no label.
    """

    kind: ExitKind
    detail: str
    code: int | None = None
    signal: str | None = None

    def __str__(self) -> str:
        return self.detail

    @classmethod
    def from_status(cls, subject: str, code: int, *, shell_codes: bool = False) -> ExitReason:
        """From an exit status: ``code < 0`` is a signal (``subprocess``' convention); with
        ``shell_codes``, ``128 + n`` is too (the convention of containers)."""
        number = -code if code < 0 else (code - 128 if shell_codes and code > 128 else None)
        if number is not None and number in signal.valid_signals():
            name = signal.Signals(number).name
            if shell_codes:
                return cls("signal", f"{subject} was killed by {name} (exit code {code})", code, name)
            hint = " (killed: out of memory, or by an operator)" if number == signal.SIGKILL else ""
            return cls("signal", f"{subject} killed by {name}{hint}", code, name)
        return cls("exit", f"{subject} exited with code {code}", code)


def loss_label(ended: ExitReason | None, unreachable: bool) -> str:
    """A lost runner's metrics label, from the structured reason its backend gave.

    ``oom`` (killed for memory), ``crash`` (it exited, was killed by a signal, or vanished),
    ``unreachable`` (no heartbeat, or its backend says it still runs) or ``lost`` (its
    channel closed and its backend cannot say more). Rewording a message changes none.
    """
    if ended is None:
        return "unreachable" if unreachable else "lost"
    return {"oom": "oom", "signal": "crash", "exit": "crash", "gone": "crash"}.get(ended.kind, "unreachable")
