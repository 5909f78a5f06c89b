"""A private network for one runner: a network namespace joined to this one by a veth pair.

The runner listens on ``runner_addr`` inside namespace ``name``; the parent reaches it from
the root namespace through ``host_addr``. ``partition()`` drops every packet between the
two with iptables (both directions, like a real partition), ``heal()`` removes the rules.
Only these private addresses, inside our own namespace, ever see traffic.

``NetnsBackend`` boots runners there: ``ip netns exec NS python -m uvicorn APP --host
ADDR --port P`` (the socket must be created inside the namespace, so unlike
ProcessBackend the parent cannot pre-bind it, and ``connect`` polls until it listens).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

from flame_asgi._base.exceptions import BootError
from flame_asgi._wire.channel import Channel
from flame_asgi.backends import Backend, RunnerHandle, RunnerSpec
from flame_asgi.backends._base import ExitReason, connect_websocket
from flame_asgi.backends.process import BARE_APP, _pythonpath, describe_exit

_serial = itertools.count()


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def ensure_tools() -> str | None:
    """Install ip/iptables if missing; return why netns cannot work here, or None."""
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        script = ("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                  "--no-install-recommends iproute2 iptables")
        result = subprocess.run(["flock", "/tmp/apt.lock", "sh", "-c", script], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            return f"cannot install iproute2/iptables: {result.stderr.strip()[-300:]}"
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    probe = f"flrp{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    listed = _run("iptables", "-w", "-L", "OUTPUT", "-n", check=False)
    if listed.returncode != 0:
        return f"iptables does not work here: {listed.stderr.strip()}"
    return None


class Netns:
    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid() % 100000}{n}"
        self.name = f"flrel{tag}"
        self.host_if, self.runner_if = f"fla{tag}", f"flb{tag}"
        # A /30 of 10.213.0.0/16 picked from our pid, so parallel test runs do not collide.
        base = ((os.getpid() * 7 + n) % 16000) * 4
        self.host_addr = f"10.213.{base // 256}.{base % 256 + 1}"
        self.runner_addr = f"10.213.{base // 256}.{base % 256 + 2}"
        self._rules: list[list[str]] = []

    def create(self) -> None:
        ns = ["ip", "netns", "exec", self.name]
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.runner_if)
        _run("ip", "link", "set", self.runner_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run(*ns, "ip", "addr", "add", f"{self.runner_addr}/30", "dev", self.runner_if)
        _run(*ns, "ip", "link", "set", self.runner_if, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")

    def partition(self) -> None:
        for rule in (["OUTPUT", "-d", self.runner_addr, "-j", "DROP"], ["INPUT", "-s", self.runner_addr, "-j", "DROP"]):
            _run("iptables", "-w", "-I", *rule)
            self._rules.append(rule)

    def heal(self) -> None:
        while self._rules:
            _run("iptables", "-w", "-D", *self._rules.pop(), check=False)

    def destroy(self) -> None:
        self.heal()
        _run("ip", "netns", "del", self.name, check=False)  # takes the veth pair with it
        _run("ip", "link", "del", self.host_if, check=False)


class NetnsBackend(Backend):
    """Boot runners inside ``netns``, listening on its private address."""

    name = "netns"

    def __init__(self, netns: Netns, *, heartbeat_interval: float = 0.3, heartbeat_timeout: float = 1.5,
                 stoppable: bool = True) -> None:
        self.netns = netns
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.stoppable = stoppable  # False: like a cloud API the parent cannot reach either
        self.handles: list[NetnsRunnerHandle] = []
        self._ports = itertools.count(8100)

    def app_import(self) -> str:
        return BARE_APP

    async def boot(self, spec: RunnerSpec) -> NetnsRunnerHandle:
        port = next(self._ports)
        env = {**os.environ, **spec.env, "PYTHONPATH": _pythonpath()}
        cmd = ["ip", "netns", "exec", self.netns.name,  # execs python: same pid
               sys.executable, "-m", "uvicorn", self.app_import(), "--host", self.netns.runner_addr,
               "--port", str(port), "--lifespan", "on", "--log-level", "warning", "--no-access-log",
               "--ws-per-message-deflate", "false", "--timeout-graceful-shutdown", "1"]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    start_new_session=True)
        handle = NetnsRunnerHandle(proc, f"http://{self.netns.runner_addr}:{port}", spec, self.stoppable)
        self.handles.append(handle)
        return handle

    async def kill_all(self) -> None:
        """Test cleanup: end every runner this backend started, and reap it."""
        for handle in self.handles:
            if handle.proc.returncode is None:
                try:
                    os.killpg(handle.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await handle.proc.wait()


class NetnsRunnerHandle(RunnerHandle):
    def __init__(self, proc: asyncio.subprocess.Process, url: str, spec: RunnerSpec, stoppable: bool) -> None:
        self.proc = proc
        self.url: str = url
        self.spec = spec
        self.stoppable = stoppable

    async def connect(self, timeout: float | None) -> Channel:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.proc.returncode is not None:
                raise BootError(f"runner exited during boot ({describe_exit(self.proc.returncode)})")
            left = None if deadline is None else max(0.05, deadline - time.monotonic())
            try:
                return await connect_websocket(self.url, left, self.spec.info.max_payload, self.spec)
            except BootError as exc:
                # Refused: uvicorn is not listening yet (no pre-bound socket here). Retry.
                if "ConnectionRefused" not in str(exc) or (deadline is not None and time.monotonic() > deadline):
                    raise
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float) -> None:
        if not self.stoppable:
            return
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                await asyncio.wait_for(self.proc.wait(), timeout)
            except (ProcessLookupError, TimeoutError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        await self.proc.wait()

    async def exit_reason(self) -> ExitReason | None:
        return describe_exit(await self.proc.wait())
