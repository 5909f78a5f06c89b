"""Every ``FLAME_*`` environment variable flame_asgi reads: one table, and typed reads.

A ``Setting`` names a variable, how its value is parsed, its default and what it means.
``SETTINGS`` lists them all, and docs/settings.md is rendered from it (a test keeps the
two equal). ``Setting.read()`` looks the variable up in ``os.environ`` on every call and
caches nothing: runner mode is decided per call, and tests change the environment. An
empty value counts as unset. A value that does not parse raises ``ValueError`` naming
the variable and what it accepts.

The backends' own variables (``FLAME_DOCKER_*``, ``FLAME_K8S_*``, ``FLAME_FLY_*``) are in
the table too, so it documents everything; ``setting(name)`` hands a backend the raw
string of any variable listed here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: ``parse`` turns its text into a value, ``accepts`` says
    in words what ``parse`` takes, ``shown`` is the default as the docs show it."""

    name: str
    parse: Callable[[str], T]
    default: T
    doc: str
    accepts: str = "text"
    shown: str | None = None

    def take(self) -> T:
        """``read()`` from ``os.environ``, then remove the variable: for keys no subprocess may inherit."""
        value = self.read()
        os.environ.pop(self.name, None)
        return value

    def read(self, environ: Mapping[str, str] | None = None) -> T:
        """The value in ``environ`` (default: ``os.environ``, now), or the default when unset."""
        value = (os.environ if environ is None else environ).get(self.name)
        if not value:
            return self.default
        try:
            return self.parse(value)
        except ValueError:
            raise ValueError(f"{self.name}={value!r} is not valid: it must be {self.accepts}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _rate(text: str) -> float:
    value = float(text)
    if math.isnan(value) or value < 0:
        raise ValueError(text)
    return value


def _choice(*options: str) -> Callable[[str], str]:
    """A parser taking one of ``options`` (any case; blank means the first one)."""

    def parse(text: str) -> str:
        value = text.strip().lower() or options[0]
        if value not in options:
            raise ValueError(text)
        return value

    return parse


def _one_of(*options: str) -> str:
    return "one of " + ", ".join(f"`{option}`" for option in options)


BACKENDS = ("local", "process", "docker", "kubernetes", "fly")
PARENT: Setting[str | None] = Setting(
    "FLAME_PARENT", str, None,
    "What a runner knows of its parent, set by the backend that boots it, never by hand. Its presence switches "
    "the app into runner mode.")
SECRET: Setting[str | None] = Setting(
    "FLAME_SECRET", str, None,
    "The parent's root key. Each runner's channel keys are derived from it; runners never receive it.",
    shown="a random key per parent process")
RUNNER_KEYS: Setting[str | None] = Setting(
    "FLAME_RUNNER_KEYS", str, None,
    "A runner's own channel keys, derived from its parent's secret and set by the backend that boots it, never by "
    "hand. The runner removes it from its environment as it reads it, so its subprocesses never see it.")
CODE_VERSION: Setting[str | None] = Setting(
    "FLAME_CODE_VERSION", str, None,
    "The code version parent and runner must share (a git sha, an image tag); a runner running another version "
    "is refused.", shown="a fingerprint of the source of flame_asgi and of the app's package")
BACKEND: Setting[str] = Setting(
    "FLAME_BACKEND", _choice(*BACKENDS), "local",
    "The backend of a pool created without `backend=`.", accepts=_one_of(*BACKENDS))
PROCESS_APP: Setting[str | None] = Setting(
    "FLAME_PROCESS_APP", str, None,
    "With `FLAME_BACKEND=process`: the app runners serve.", accepts="an import string, `module:attribute`",
    shown="found from the app the pool is registered on")
MAX_PAYLOAD: Setting[int] = Setting(
    "FLAME_MAX_PAYLOAD", _positive_int, 512 * 1024 * 1024,
    "The largest message on the channel, in bytes: a larger call, result or event raises `PayloadTooLarge`. "
    "Runners use their parent's value.", accepts="a positive integer", shown="`536870912` (512 MiB)")
MAX_TRANSFER: Setting[int] = Setting(
    "FLAME_MAX_TRANSFER", _positive_int, 16 << 30,
    "The default `limit` of an `Upload`: the most bytes one transfer carries.", accepts="a positive integer",
    shown="`17179869184` (16 GiB)")
RUNNER_LOGS: Setting[str] = Setting(
    "FLAME_RUNNER_LOGS", _choice("json", "text"), "json",
    "In a process or docker runner: `json` sends log records to the parent as records, `text` leaves them to "
    "Python's last-resort handler, as text.", accepts=_one_of("json", "text"))
RUNNER_LOG_RATE: Setting[float] = Setting(
    "FLAME_RUNNER_LOG_RATE", _rate, 200.0,
    "Lines of a runner's output the parent logs per second, per runner; the rest are dropped and counted.",
    accepts="a number, 0 or more", shown="`200`")
RUNNER_LOG_BURST: Setting[int] = Setting(
    "FLAME_RUNNER_LOG_BURST", _count, 1000,
    "Lines of a runner's output the parent logs at once, above the rate.", accepts="an integer, 0 or more")

_DOCKER = "With `FLAME_BACKEND=docker`: "
_K8S = "With `FLAME_BACKEND=kubernetes`: "
_FLY = "With `FLAME_BACKEND=fly`: "
_BACKEND_SETTINGS: tuple[Setting[Any], ...] = (
    Setting("FLAME_DOCKER_IMAGE", str, None, _DOCKER + "the image of the runners.",
            shown="the parent's own image"),
    Setting("FLAME_DOCKER_APP", str, None, _DOCKER + "the app runners serve.",
            accepts="an import string, `module:attribute`", shown="found from the pool's app"),
    Setting("FLAME_DOCKER_PYTHON", str, "python", _DOCKER + "the interpreter of the runner's command."),
    Setting("FLAME_DOCKER_CPUS", float, None, _DOCKER + "the CPU limit of a runner (`docker run --cpus`).",
            accepts="a number", shown="unlimited"),
    Setting("FLAME_DOCKER_MEMORY", str, None, _DOCKER + "the memory limit of a runner (`docker run --memory`).",
            accepts="bytes, or `512m`, `2g`", shown="unlimited"),
    Setting("FLAME_DOCKER_NETWORK", str, None, _DOCKER + "the Docker network runners join.",
            shown="the Engine's default bridge"),
    Setting("FLAME_DOCKER_BINDS", str, None, _DOCKER + "bind mounts (`docker run -v`).",
            accepts="comma-separated `host_path:container_path[:ro]`", shown="none"),
    Setting("FLAME_DOCKER_WORKDIR", str, None, _DOCKER + "the runner container's working directory.",
            shown="the image's `WORKDIR`"),
    Setting("FLAME_DOCKER_HOST_IP", str, "127.0.0.1",
            _DOCKER + "where a runner's port is published; `none` publishes nothing and dials the container's "
            "address on its network.", accepts="an IP address, or `none`"),
    Setting("FLAME_DOCKER_STANDBY", int, 0, _DOCKER + "containers kept created, not started, for the next "
            "boots (a boot is then a start).", accepts="an integer >= 0"),
    Setting("FLAME_K8S_PARENT_POD", str, None, _K8S + "the Pod runners are cloned from and owned by.",
            shown="`POD_NAME`, else the host name"),
    Setting("FLAME_K8S_NAMESPACE", str, None, _K8S + "where runners are created.",
            shown="`POD_NAMESPACE`, else the service account's"),
    Setting("FLAME_K8S_CONTAINER", str, None, _K8S + "which of the parent Pod's containers runners copy.",
            shown="the first"),
    Setting("FLAME_K8S_IMAGE", str, None, _K8S + "the image of the runners.", shown="the parent container's"),
    Setting("FLAME_K8S_APP", str, None, _K8S + "the app runners serve.",
            accepts="an import string, `module:attribute`", shown="found from the pool's app"),
    Setting("FLAME_K8S_PYTHON", str, None, _K8S + "the interpreter of the runner's command.",
            shown="the parent's `sys.executable` (same image), else `python`"),
    Setting("FLAME_K8S_CPU", str, None, _K8S + "CPU request and limit of a runner.",
            accepts="a quantity such as `500m`", shown="the parent container's"),
    Setting("FLAME_K8S_MEMORY", str, None, _K8S + "memory request and limit of a runner.",
            accepts="a quantity such as `2Gi`", shown="the parent container's"),
    Setting("FLAME_K8S_TEMPLATE", str, None, _K8S + "a Pod manifest merged over the generated runner Pod.",
            accepts="a YAML or JSON file path", shown="none"),
    Setting("FLAME_K8S_PORT", int, 8000, _K8S + "the port runners listen on, on their Pod IP.",
            accepts="an integer"),
    Setting("FLAME_K8S_HOST_NETWORK", _choice("0", "1"), "0",
            _K8S + "`1` runs runner Pods on their node's network, each on a port of its own from "
            "20000-29999, bound to the node's address (clusters without a Pod network, or that want none).",
            accepts="`0` or `1`"),
    Setting("FLAME_POD_IP", str, None, "Set by `KubernetesBackend` in a host-network runner Pod, never by hand: "
            "the node's address (downward API `status.podIP`), which the runner binds.",
            accepts="an IP address", shown="set by the backend"),
    Setting("FLAME_K8S_KUBECONFIG", str, None, _K8S + "the kubeconfig file to reach the API server with.",
            accepts="a file path", shown="in-cluster, else `KUBECONFIG` or `~/.kube/config`"),
    Setting("FLAME_K8S_CONTEXT", str, None, _K8S + "the kubeconfig context to use.",
            shown="the kubeconfig's current context"),
    Setting("FLAME_FLY_CPU_KIND", str, "performance", _FLY + "the CPU kind of a runner machine.",
            accepts="`performance` or `shared`"),
    Setting("FLAME_FLY_CPUS", int, 1, _FLY + "CPUs of a runner machine.", accepts="an integer"),
    Setting("FLAME_FLY_MEMORY_MB", int, 2048, _FLY + "memory of a runner machine, in MB.",
            accepts="an integer, a multiple of 256"),
    Setting("FLAME_FLY_GPU_KIND", str, None, _FLY + "the GPU kind of a runner machine.",
            accepts="a Fly GPU kind such as `a100-pcie-40gb`", shown="no GPU"),
    Setting("FLAME_FLY_GPUS", int, None, _FLY + "GPUs of a runner machine.", accepts="an integer",
            shown="1 with `FLAME_FLY_GPU_KIND`, else 0"),
    Setting("FLAME_FLY_RUNNER_HOST", str, "{private_ip}",
            _FLY + "how the parent reaches a machine: a template over its `{id}`, `{name}`, `{private_ip}`, "
            "`{region}`, `{instance_id}`, `{app}`.", accepts="a host template"),
    Setting("FLAME_FLY_API_URL", str, "https://api.machines.dev", _FLY + "the Machines API.", accepts="a URL"),
    Setting("FLAME_FLY_STANDBY", int, 0, _FLY + "machines kept created or stopped for the next boots (a "
            "boot is then a start); the machines of runners that ended are reused.", accepts="an integer >= 0"),
)

SETTINGS: tuple[Setting[Any], ...] = (
    BACKEND, PROCESS_APP, MAX_PAYLOAD, MAX_TRANSFER, CODE_VERSION, SECRET, RUNNER_KEYS, PARENT, RUNNER_LOGS,
    RUNNER_LOG_RATE, RUNNER_LOG_BURST, *_BACKEND_SETTINGS,
)
_BY_NAME = {entry.name: entry for entry in SETTINGS}


def setting(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The raw value of variable ``name`` (``None`` when unset); ``name`` must be in ``SETTINGS``.

    For code that parses a value itself (the backends' ``from_env``): listing the variable
    here first keeps docs/settings.md complete.
    """
    _entry(name)
    return (os.environ if environ is None else environ).get(name)


def setting_value(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value of variable ``name`` (its default when unset); a value its parser
    refuses raises ValueError naming the variable and what it accepts."""
    return _entry(name).read(environ)


def _entry(name: str) -> Setting[Any]:
    if name not in _BY_NAME:
        raise KeyError(f"{name} is not in flame_asgi's settings table (flame_asgi/_settings.py): add it there")
    return _BY_NAME[name]


def markdown_table() -> str:
    """The table docs/settings.md shows: every variable, its default, what it accepts and means."""
    rows = ["| variable | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    for entry in SETTINGS:
        if entry.shown is not None:
            default = entry.shown
        elif entry.default is None:
            default = "unset"
        else:
            default = f"`{entry.default}`"
        rows.append(f"| `{entry.name}` | {default} | {entry.accepts} | {entry.doc} |")
    return "\n".join(rows) + "\n"
