"""Worker threads for sync remote code: a few for quick calls, more when calls block.

A plain ThreadPoolExecutor starts a new thread for every submission that finds no idle
one, so a burst of 100 trivial calls makes 100 threads fighting over the GIL. This pool
keeps ``core`` threads; beyond them it starts another only when submitted work has
waited ``GROW_AFTER`` seconds (its threads are blocked: sleeping, in I/O, waiting on a
subprocess), up to ``max_workers``, so blocking calls still run side by side.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

GROW_AFTER = 0.005


class ElasticThreadPool(ThreadPoolExecutor):
    # Relies on ThreadPoolExecutor's private _adjust_thread_count/_idle_semaphore/
    # _threads/_work_queue, stable from Python 3.8 through 3.13.
    def __init__(self, loop: asyncio.AbstractEventLoop, *, core: int = 4, max_workers: int = 512) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="flame-work")
        self._loop = loop
        self._core = core
        self._grow_scheduled = False

    def _adjust_thread_count(self) -> None:
        if len(self._threads) < self._core:
            super()._adjust_thread_count()
            return
        if self._idle_semaphore.acquire(timeout=0):
            return  # an idle thread takes it
        if not self._grow_scheduled and len(self._threads) < self._max_workers:
            self._grow_scheduled = True
            self._loop.call_soon_threadsafe(self._loop.call_later, GROW_AFTER, self._grow)

    def _grow(self) -> None:
        self._grow_scheduled = False
        with self._shutdown_lock:
            if self._shutdown or self._work_queue.empty():
                return
            super()._adjust_thread_count()  # work still waits: its threads are blocked
        if not self._work_queue.empty() and len(self._threads) < self._max_workers:
            self._grow_scheduled = True
            self._loop.call_later(GROW_AFTER, self._grow)
