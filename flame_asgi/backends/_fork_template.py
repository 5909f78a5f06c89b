"""The fork server: a pre-imported template process that forks ProcessBackend runners.

A fresh interpreter spends ~350 ms importing FastAPI, uvicorn and the app before it can
serve; a fork of a process that already imported them is serving in tens of ms. The
template imports the app module (without starting it: no lifespan, no threads), then
waits for requests on a SOCK_SEQPACKET socket. Each request carries the runner's
environment (but its keys) plus three descriptors: its listening socket, a stderr pipe and
a pipe holding its keys. The template forks a child that sets them up, reads its keys and
runs uvicorn on that socket, and reports the child's
pid, then its exit status when it reaps it. It never forks while holding a thread:
a fork of a threaded process can deadlock. It never reads a runner's keys either: what it
read would stay in the memory every later fork inherits, readable to the runner it makes.

A spare: once a request has been answered and the template has been quiet for
``SPARE_AFTER``, it forks one child ahead of the next request. The spare does what every
child does before it knows which runner it is (its own session, uvicorn's configuration,
logging, the app looked up: ~5 ms of a ~18 ms scale-from-zero call, with the fork
itself), then sleeps in ``recv`` on a socket of its own until the template hands it the
next request, or the template is gone. It costs no CPU while it waits; a burst of
requests takes it for the first one and forks the rest as before.

Run as ``python -m flame_asgi.backends._fork_template APP CONTROL_FD``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from flame_asgi._base.settings import PARENT

MAX_MESSAGE = 1 << 20
SPARE_AFTER = 0.05  # quiet time after a request before a spare is forked: never amid a burst


def _send(ctrl: socket.socket, message: dict[str, Any]) -> None:
    ctrl.sendall(json.dumps(message).encode())


def _own_session(grouped: int) -> None:
    os.setsid()  # its own process group: the parent stops it (and what it spawns) as one
    os.close(grouped)  # tells the template it may report this pid: signals to its group now reach it
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


FDS = 3  # what comes with a request: the runner's listening socket, its stderr, its keys


def _run(request: dict[str, Any], fds: list[int], config: Any = None) -> int:
    listen_fd, stderr_fd, keys_fd = fds
    os.dup2(stderr_fd, 2)
    os.close(stderr_fd)
    os.environ.update(request["env"])
    from flame_asgi.backends._serve import serve, take_keys

    take_keys(keys_fd)

    return serve(request["app"], listen_fd, log_level=request["log_level"], ws_max_size=request["ws_max_size"],
                 graceful=request["graceful"], config=config)


def _child(request: dict[str, Any], fds: list[int], ctrl: socket.socket, grouped: int) -> int:
    ctrl.close()
    _own_session(grouped)
    return _run(request, fds)


def _spare(sock: socket.socket, grouped: int, like: dict[str, Any]) -> int:
    """A child forked ahead of a request: prepared as for one like ``like`` (the last), then
    waiting for its own."""
    _own_session(grouped)
    from flame_asgi.backends._serve import prepare

    config: Any = prepare(like["app"], log_level=like["log_level"], ws_max_size=like["ws_max_size"],
                          graceful=like["graceful"])
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, FDS)
    sock.close()
    if not data:  # the template is gone: no runner will come of this spare
        return 0
    request = json.loads(data)
    # uvicorn's configuration read the environment (FORWARDED_ALLOW_IPS, WEB_CONCURRENCY):
    # prepared before this runner's was set, it holds only if nothing else differs.
    changed = {name for name, value in request["env"].items() if os.environ.get(name) != value}
    if any(request[name] != like[name] for name in SETTINGS) or changed - {PARENT.name}:
        config = None
    return _run(request, fds, config)


def _import_what_uvicorn_starts_with() -> None:
    # uvicorn imports its loop, protocol and lifespan classes by name as it starts, and its
    # "auto" loop is uvloop when that is installed (uvicorn[standard]): imported here once,
    # they cost each fork nothing; left to the child, uvloop alone took ~5 ms of a ~18 ms
    # scale-from-zero call.
    import concurrent.futures.thread  # noqa: F401  # the runner's worker threads

    from uvicorn import config
    from uvicorn.importer import import_from_string

    for table, key in (("HTTP_PROTOCOLS", "auto"), ("WS_PROTOCOLS", "auto"), ("LIFESPAN", "on"),
                       ("LOOP_FACTORIES", "auto"), ("LOOP_SETUPS", "auto")):
        target = getattr(config, table, {}).get(key)  # older uvicorns name the loop table LOOP_SETUPS
        if target:
            import_from_string(target)
    with contextlib.suppress(ImportError):
        import uvicorn.loops.uvloop  # noqa: F401  # which "auto" imports as the loop is made (0.5 ms)
        import uvloop  # noqa: F401  # what "auto" picks when it can


def serve(app: str, ctrl: socket.socket) -> None:
    # Import everything a runner needs before the first fork.
    import uvicorn
    import uvicorn.config
    import uvicorn.protocols.http.httptools_impl
    import uvicorn.protocols.websockets.auto  # noqa: F401

    import flame_asgi
    import flame_asgi.backends._serve  # noqa: F401
    from flame_asgi._base.parent import code_version

    _import_what_uvicorn_starts_with()

    module, _, attr = app.partition(":")
    getattr(importlib.import_module(module), attr or "app")
    code_version(app)  # hashed once here: every fork inherits the fingerprint of this code
    if threading.active_count() != 1:
        _send(ctrl, {"error": f"importing {app} started threads; forking it is unsafe"})
        return
    Template(ctrl).run()


# Only these of a request are kept for the spare: not its environment, which is another runner's.
SETTINGS = ("app", "log_level", "ws_max_size", "graceful")


class Template:
    """The fork server's loop: requests in, forks out, exits reported."""

    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.children: set[int] = set()
        self.spare: Spare | None = None
        self.unreported: set[int] = set()  # spares that died untaken, not reaped yet
        self.like: dict[str, Any] | None = None  # the last request's settings, until a spare is forked like it
        # Sleep until a request or a child's exit, never on a timer: an idle template would
        # otherwise wake 20 times a second for as long as the pool lives, and an exit would
        # be reported up to one tick late. SIGCHLD's handler does nothing; the wakeup fd it
        # writes to is what ends the select, so an exit between the reaping and the select
        # is not lost.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def run(self) -> None:
        _send(self.ctrl, {"ready": os.getpid()})
        try:
            while True:
                # A timeout only to fork a spare after a request: otherwise no timer at all.
                timeout = SPARE_AFTER if self.like is not None and self.spare is None else None
                readable, _, _ = select.select([self.ctrl.fileno(), self.wake_r], [], [], timeout)
                if self.wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                self._reap()
                if not readable:
                    self._fork_spare()
                elif self.ctrl.fileno() in readable and not self._answer():
                    return  # the parent is gone; children watch their own channels
        finally:
            if self.spare is not None:
                self.spare.close()

    def _reap(self) -> None:
        """Reap, and report how each child ended."""
        while self.children or self.spare is not None or self.unreported:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare.pid:  # nobody's runner yet: no exit to report
                self.spare.sock.close()
                self.spare = None
                _send(self.ctrl, {"spare": 0})
            elif pid in self.unreported:
                self.unreported.discard(pid)
            else:
                self.children.discard(pid)
                _send(self.ctrl, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    def _answer(self) -> bool:
        """Give the parent's next request its runner: the spare, or a fork. False: the parent is gone."""
        data, fds, _, _ = socket.recv_fds(self.ctrl, MAX_MESSAGE, FDS)
        if not data:
            return False
        request = json.loads(data)
        pid = self.spare.take(data, fds) if self.spare is not None else None
        if pid is None and self.spare is not None:
            self.unreported.add(self.spare.pid)  # it died before it was taken: reaped, never reported
            _send(self.ctrl, {"spare": 0})
        self.spare = None
        if pid is None:
            pid = _fork(lambda grouped: _child(request, fds, self.ctrl, grouped), close=(self.wake_r, self.wake_w))
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        _send(self.ctrl, {"pid": pid, "id": request["id"]})  # replies name their request
        self.like = {name: request[name] for name in SETTINGS}
        return True

    def _fork_spare(self) -> None:
        assert self.like is not None
        self.spare, self.like = Spare.fork(self.like, self.ctrl, close=(self.wake_r, self.wake_w)), None
        _send(self.ctrl, {"spare": self.spare.pid})


def _fork(body: Callable[[int], int], close: tuple[int, ...]) -> int:
    """Fork a child that drops the template's signal set-up and the descriptors in
    ``close``, runs ``body(grouped)`` (which closes ``grouped`` once the child has its own
    process group) and exits with its status. Returns the child's pid once it has that
    group, or has died."""
    grouped_r, grouped_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (grouped_r, *close):
                os.close(fd)
            code = body(grouped_w)
        except SystemExit as exc:  # uvicorn's own exit: its log already says why
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(grouped_w)
    os.read(grouped_r, 1)  # EOF once the child has its own process group (or has died)
    os.close(grouped_r)
    return pid


class Spare:
    """The template's end of its spare child."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, like: dict[str, Any], ctrl: socket.socket, close: tuple[int, ...]) -> Spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

        def spare(grouped: int) -> int:
            ours.close()
            ctrl.close()
            return _spare(theirs, grouped, like)

        try:
            return cls(_fork(spare, close), ours)
        finally:
            theirs.close()

    def take(self, data: bytes, fds: list[int]) -> int | None:
        """Hand the spare a request: its pid, or None if it is gone (then fork as before)."""
        try:
            socket.send_fds(self.sock, [data], fds)
        except OSError:
            return None  # it died: reaped, unreported, with the next exits
        finally:
            self.sock.close()
        return self.pid

    def close(self) -> None:
        """The template is ending: the spare sees the socket close and exits; reap it."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    control = socket.socket(fileno=int(sys.argv[2]))
    try:
        serve(sys.argv[1], control)
    except Exception as exc:  # tell the parent why, so it can fall back
        try:
            _send(control, {"error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        sys.exit(1)
