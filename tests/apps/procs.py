"""/proc helpers shared by the test apps and the tests (Linux)."""

from __future__ import annotations

import os


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def child_pids(parent: int, *, zombies: bool = False) -> set[int]:
    """Children of ``parent``: live ones, and with ``zombies`` those not reaped yet too."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == parent and (zombies or fields[0] != "Z"):
                found.add(int(entry))
    return found


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, their children...)."""
    out: set[int] = set()
    frontier = [root]
    while frontier:
        kids = child_pids(frontier.pop())
        frontier.extend(kids - out)
        out |= kids
    return out


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"
