"""``pool.stream(...)``: an async iterator over what a generator yields on a runner.

The slot is taken on the first ``__anext__`` and freed when the generator ends, the
consumer stops (``aclose``, ``break`` out of ``async with``, garbage collection) or the
runner is lost. Items flow within a credit window, so a fast generator waits for a slow
consumer instead of filling the parent's memory.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from flame_asgi._base.exceptions import CallTimeout
from flame_asgi._observe import telemetry
from flame_asgi._pool.placement import Placement, Starter
from flame_asgi._wire.connection import RemoteCall
from flame_asgi._wire.payload import Payload
from flame_asgi._wire.pickling import loads
from flame_asgi._wire.transfer import forget


class RemoteStream:
    """Iterate with ``async for``; ``timeout`` bounds the wait for each next item."""

    def __init__(self, dispatch: Starter, placement: Placement, fn: Any, payload: Payload, tokens: list[str], *,
                 wait: float | None, per_item: float | None, link: bool,
                 on_progress: Callable[[Any], Any] | None) -> None:
        self._dispatch = dispatch
        self._placement = placement
        self._on_progress = on_progress
        self._tokens = tokens
        self._fn = fn
        self._payload: Payload | None = payload
        self._wait = wait  # for a slot
        self._per_item = per_item
        self._link = link
        self._remote: RemoteCall | None = None
        self._rid = ""
        self._done = False
        self._obs = telemetry.OFF

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        dispatch = self._dispatch
        scope = None
        per_item = self._per_item
        try:
            if self._remote is None:
                self._obs = dispatch.observe("stream", self._fn)
                self._rid = await self._placement.checkout(self._tokens, self._wait)
                assert self._payload is not None
                self._remote = await dispatch.start(self._rid, "stream", self._payload, link=self._link,
                                                    progress=self._on_progress is not None, obs=self._obs,
                                                    tokens=self._tokens, placement=self._placement)
                self._payload = None
            async with asyncio.timeout(per_item) as scope:
                type_, data = await self._remote.next()
                while type_ == "event":  # progress reported between items
                    assert self._on_progress is not None
                    result = self._on_progress(loads(data, self._remote.hub))
                    if inspect.isawaitable(result):
                        await result
                    type_, data = await self._remote.next()
        except TimeoutError as exc:
            # ``scope`` is None when the wait for a slot timed out (a CallTimeout already).
            if scope is not None and scope.expired():
                error = CallTimeout(f"stream did not yield its next item within {per_item:g} s; "
                                    "it was cancelled on the runner")
                self._close(error, cancel=True)  # a timeout ends the remote work, linked or not
                raise error from None
            self._close(exc)
            raise
        except BaseException as exc:
            self._close(exc)
            raise
        if type_ == "item":
            return loads(data, self._remote.hub)
        if type_ == "end":
            self._close(None, "ok")
            raise StopAsyncIteration
        failure = self._remote.failure(type_, data)
        self._close(failure)
        raise failure

    def forward_progress(self, on_progress: Callable[[Any], Any]) -> None:
        """Send progress events to ``on_progress`` too, if the stream has not started yet."""
        if self._remote is None and self._on_progress is None:
            self._on_progress = on_progress

    def _close(self, exc: BaseException | None = None, outcome: str = "stopped", *, cancel: bool = False) -> None:
        """Stop for good: ``exc`` ended the stream, or it ended (``ok``) or was dropped (``stopped``)."""
        self._done = True
        self._obs.end(exc, None if exc is not None else outcome)
        if self._remote is not None:
            self._remote.abandon(self._link or cancel)

    async def aclose(self) -> None:
        """Stop consuming: the remote generator is cancelled if linked, and the slot freed."""
        self._close()

    def cancel(self) -> None:
        """Stop the stream and cancel its generator on the runner, linked or not (what a
        browser leaving a ``relay`` does). Nothing more is yielded."""
        self._close(cancel=True)

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def __del__(self) -> None:
        if self._remote is None:
            forget(self._tokens)  # never started: its Uploads will never be pulled
        elif not self._done:
            try:
                self._close()
            except RuntimeError:  # no running loop any more: the pool is gone too
                pass
