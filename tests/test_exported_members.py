from __future__ import annotations
import __future__

import re
import types

import pytest

import flame_asgi
import flame_asgi.backends


def public_names(module: types.ModuleType) -> set[str]:
    """What ``from module import *`` would offer without ``__all__``: every name not starting with
    ``_``, less submodules and ``from __future__`` directives."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, (types.ModuleType, __future__._Feature))
    }


@pytest.mark.parametrize("module", [flame_asgi, flame_asgi.backends], ids=lambda m: m.__name__)
def test_all_is_exactly_the_public_names(module: types.ModuleType) -> None:
    exported = module.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    # Loaded on first use by the module's __getattr__ (optional extras): exported too.
    lazy = set(exported) - set(vars(module))
    assert all(getattr(module, name) is not None for name in lazy)
    assert public_names(module) == set(exported) - lazy, "a public name is missing from __all__, or leaked"


def test_public_surface_is_pinned() -> None:
    contract = {"FastAPI", "FlamePool", "flame_pool", "parent", "report", "LocalBackend", "ProcessBackend",
                "DockerBackend", "KubernetesBackend", "FlyBackend", "FlameError", "BootError", "CallTimeout",
                "RunnerLost", "RemoteError"}
    assert contract <= set(flame_asgi.__all__)
    for name in flame_asgi.__all__:
        assert getattr(flame_asgi, name) is not None


def test_exception_tree() -> None:
    for name in ("BootError", "CallTimeout", "RunnerLost", "RemoteError", "SerializationError", "PayloadTooLarge",
                 "ProtocolError", "PoolClosed", "VersionSkew", "TransferError"):
        assert issubclass(getattr(flame_asgi, name), flame_asgi.FlameError)
    assert issubclass(flame_asgi.CallTimeout, TimeoutError)


def test_the_exception_tree_is_drawn_with_every_class() -> None:
    from flame_asgi._base import exceptions

    defined = {name for name, value in vars(exceptions).items()
               if isinstance(value, type) and issubclass(value, flame_asgi.FlameError)}
    doc = exceptions.__doc__ or ""
    assert {name for name in defined if not re.search(rf"^ +[│├└─ ]*{name}\b", doc, re.M)} == set()
