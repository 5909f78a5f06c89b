"""Functions the observability tests run on runners (importable there by reference)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

from flame_asgi import parent


def square(x: int) -> int:
    return x * x


def runner_id() -> str | None:
    info = parent()
    return info.runner_id if info else None


def fail() -> None:
    raise ValueError("remote boom")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def count(n: int) -> Iterator[int]:
    yield from range(n)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def traced_work(x: int) -> dict[str, str]:
    """Makes a span of its own: it must nest under the runner's span."""
    from opentelemetry import trace

    with trace.get_tracer("tests.work").start_as_current_span("inner work") as span:
        ctx = span.get_span_context()
        return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x"),
                "square": str(x * x)}


def log_things(tag: str) -> str | None:
    log = logging.getLogger("obs.remote")
    log.warning("hello %s from %s", tag, os.getpid(), extra={"job": 7, "label": "thumbs"})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("it failed: %s", tag)
    logging.getLogger("obs.remote.quiet").info("not at WARNING: dropped by the runner's own levels")
    return runner_id()


def print_things(tag: str) -> str | None:
    print(f"printed {tag}")
    sys.stderr.write(f"stderr {tag}\n")
    sys.stderr.flush()
    return runner_id()


def chatter(lines: int) -> int:
    for i in range(lines):
        sys.stderr.write(f"chatter line {i}\n")
    sys.stderr.flush()
    return lines


def long_line(size: int) -> str | None:
    sys.stderr.write("x" * size + "\n")
    sys.stderr.write("after the long line\n")
    sys.stderr.flush()
    return runner_id()
