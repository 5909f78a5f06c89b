"""A runner's output in its parent's logging: log records, stdout and stderr, tagged and bounded.

In the runner (runner mode, backends whose output the parent reads: process, docker),
``forward_runner_logs`` makes the last-resort logging handler (the one Python uses when
no handler is configured) write each record as one JSON line on stderr, and sends
stdout to stderr too. In the parent, ``RunnerOutput`` turns those lines back into log
records on their own logger names, logs any other line on ``flame_asgi.runner``, tags
both with ``extra={"flame_pool": ..., "flame_runner": ...}``, and drops lines beyond a
rate (``FLAME_RUNNER_LOG_RATE`` lines/s, bursts of ``FLAME_RUNNER_LOG_BURST``), then logs
how many it dropped. The pipe is always drained, so a chatty runner never blocks on it.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from flame_asgi._base.parent import ParentInfo
from flame_asgi._base.settings import RUNNER_LOG_BURST, RUNNER_LOG_RATE, RUNNER_LOGS

log = logging.getLogger("flame_asgi.runner")
MARK = '{"flame_log":'
FORWARDED_BACKENDS = frozenset({"process", "docker"})  # their runners' output reaches the parent
MAX_LINE = 32 * 1024  # bytes of one line kept; the rest is cut
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_SCALARS = (str, int, float, bool, type(None))


# -- in the runner ----------------------------------------------------------------------
class JsonLineHandler(logging.Handler):
    """Writes each record as one JSON line on (the current) ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = encode_record(record, self.formatter or _FORMATTER)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_FORMATTER = logging.Formatter()


def encode_record(record: logging.LogRecord, formatter: logging.Formatter = _FORMATTER) -> str:
    data: dict[str, Any] = {
        "flame_log": 1, "name": record.name, "levelno": record.levelno, "levelname": record.levelname,
        "msg": record.getMessage(), "created": record.created, "pathname": record.pathname,
        "lineno": record.lineno, "funcName": record.funcName, "process": record.process,
        "threadName": record.threadName,
    }
    if record.exc_info:
        data["exc_text"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        data["exc_text"] = record.exc_text
    if record.stack_info:
        data["stack_info"] = record.stack_info
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and isinstance(v, _SCALARS)}
    if extra:
        data["extra"] = extra
    return json.dumps(data, default=str, ensure_ascii=False)


def forward_runner_logs(info: ParentInfo) -> None:
    """In runner mode: unhandled log records and stdout go to stderr, which the parent reads.

    Only Python's last-resort handler is replaced: an app that configures its own
    handlers keeps them (their lines reach the parent as text). ``FLAME_RUNNER_LOGS=text``
    turns this off.
    """
    if info.backend not in FORWARDED_BACKENDS or RUNNER_LOGS.read() == "text":
        return
    if isinstance(logging.lastResort, JsonLineHandler):
        return
    logging.lastResort = JsonLineHandler()
    if info.backend == "process":
        _stdout_to_stderr()


def _stdout_to_stderr() -> None:
    # A ProcessBackend runner inherits the parent's stdout: print() output would appear
    # there untagged (and, through a pipe, only when a buffer fills). Through stderr it is
    # tagged and rate-limited like the rest, a line at a time.
    try:
        sys.stdout.flush()
        os.dup2(2, 1)
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


# -- in the parent ----------------------------------------------------------------------
class RunnerOutput:
    """One runner's output lines into the parent's logging, at a bounded rate."""

    def __init__(self, pool: str, runner: str, *, rate: float | None = None, burst: int | None = None) -> None:
        self.tags = {"flame_pool": pool, "flame_runner": runner}
        self.prefix = f"[{pool}/{runner}] "
        self.rate = rate if rate is not None else RUNNER_LOG_RATE.read()  # lines per second, sustained
        self.burst = burst if burst is not None else RUNNER_LOG_BURST.read()  # lines at once
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self.dropped = 0  # since the last report
        self.dropped_total = 0

    def line(self, text: str) -> str:
        """Log one line (within the rate); return it as a person reads it (for the tail)."""
        record = _parse(text) if text.startswith(MARK) else None
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            self.dropped += 1
            self.dropped_total += 1
        else:
            self._tokens -= 1.0
            if self.dropped:
                self._report_dropped()
            if record is None:
                log.warning("%s%s", self.prefix, text, extra=self.tags)
            else:
                self._relay(record)
        return text if record is None else _readable(record)

    def close(self) -> None:
        if self.dropped:
            self._report_dropped()

    def _report_dropped(self) -> None:
        count, self.dropped = self.dropped, 0
        log.warning("%s%d line(s) of runner output dropped: over %g lines/s (FLAME_RUNNER_LOG_RATE)",
                    self.prefix, count, self.rate, extra={**self.tags, "flame_dropped": count})

    def _relay(self, data: dict[str, Any]) -> None:
        logger = logging.getLogger(data["name"])
        if not logger.isEnabledFor(data["levelno"]):
            return
        created = float(data.get("created") or time.time())
        pathname = str(data.get("pathname", ""))
        fields: dict[str, Any] = {
            k: v for k, v in (data.get("extra") or {}).items() if k not in _STANDARD and isinstance(v, _SCALARS)}
        fields.update(
            name=data["name"], levelno=data["levelno"], levelname=data["levelname"],
            msg=self.prefix + str(data.get("msg", "")), args=None, created=created,
            msecs=(created - int(created)) * 1000, pathname=pathname, filename=os.path.basename(pathname),
            lineno=int(data.get("lineno") or 0), funcName=str(data.get("funcName", "")),
            process=data.get("process"), threadName=str(data.get("threadName", "")),
            exc_text=data.get("exc_text"), stack_info=data.get("stack_info"), **self.tags,
        )
        logger.handle(logging.makeLogRecord(fields))


def _parse(text: str) -> dict[str, Any] | None:
    """A record line, checked; ``None`` when it is not one after all (it is logged as text)."""
    try:
        data = json.loads(text)
        data["name"] = str(data["name"])
        data["levelno"] = int(data["levelno"])
    except (ValueError, KeyError, TypeError):
        return None
    data["levelname"] = str(data.get("levelname") or logging.getLevelName(data["levelno"]))
    return data  # type: ignore[no-any-return]


def _readable(data: dict[str, Any]) -> str:
    text = f"{data['levelname']}:{data['name']}:{data.get('msg', '')}"
    return f"{text}\n{data['exc_text']}" if data.get("exc_text") else text


async def relay_lines(stream: asyncio.StreamReader, output: RunnerOutput, tail: collections.deque[str]) -> None:
    """Read a runner's output to its end: keep the ``tail`` (for boot errors), log through ``output``."""
    try:
        async for text in read_lines(stream):
            tail.append(output.line(text))
    finally:
        output.close()


async def read_lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Lines of ``stream``; a line longer than its buffer limit is cut, not fatal.

    (``async for`` over a StreamReader raises on such a line: the pipe would stop being
    read and the runner would block on its next write.)
    """
    skipping = False
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:  # the end, maybe after a last unterminated line
            if exc.partial and not skipping:
                yield _text(exc.partial)
            return
        except asyncio.LimitOverrunError as exc:
            chunk = await stream.readexactly(exc.consumed)
            if not skipping:
                skipping = True
                yield _text(chunk[:MAX_LINE]) + " [... line cut]"
            continue
        if skipping:  # the end of a line already cut
            skipping = False
            continue
        yield _text(raw)


def _text(raw: bytes) -> str:
    if len(raw) > MAX_LINE:
        return raw[:MAX_LINE].decode(errors="replace") + " [... line cut]"
    return raw.decode(errors="replace").rstrip()
