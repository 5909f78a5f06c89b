"""Run a command as a child subreaper and report every process it reaps.

``python -m tests.reliability.reaper CMD...`` starts CMD. Being a subreaper
(prctl PR_SET_CHILD_SUBREAPER), it adopts the runners orphaned when CMD dies, instead of
PID 1 (which, on this machine, never reaps them). It prints ``started PID`` for CMD and
``reaped PID STATUS MONOTONIC_TIME`` for each process it reaps, and exits when none is
left. SIGTERM makes it SIGKILL every process it still has (test cleanup).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    terminating = False

    def terminate(signum: int, frame: object) -> None:
        nonlocal terminating
        terminating = True

    signal.signal(signal.SIGTERM, terminate)
    child = subprocess.Popen(sys.argv[1:])
    child.returncode = 0  # reaped below, by waitpid(-1): keep Popen from trying again
    print(f"started {child.pid}", flush=True)
    while True:
        if terminating:
            for pid in _children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
            continue
        print(f"reaped {pid} {status} {time.monotonic():.4f}", flush=True)


if __name__ == "__main__":
    main()
