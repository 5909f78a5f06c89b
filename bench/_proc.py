"""Reading /proc: every process's stat fields, for the benchmarks' process bookkeeping."""

from __future__ import annotations

import os
from collections.abc import Iterator


def stats() -> Iterator[tuple[int, list[str]]]:
    """``(pid, fields)`` for every live process; ``fields`` start after the command name:
    state, ppid, pgrp, session, ..., utime at [11], stime at [12] (see proc(5))."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry.name), fields
