"""Run FastAPI's and Starlette's own test suites against flame_asgi's drop-in classes.

Loaded as a pytest plugin (``-p substitute``, this folder on ``PYTHONPATH``), so before any
test module is imported, it replaces (and, through ``FLAME_UPSTREAM_SUBSTITUTE`` and the
``.pth`` file run.sh puts in the venv, so it does in the subprocesses that tests start):

- ``fastapi.FastAPI`` / ``fastapi.applications.FastAPI`` with a subclass of
  ``flame_asgi.FastAPI`` that registers one pool, ``"probe"``;
- ``starlette.applications.Starlette.__init__`` (in place) with one that also calls
  ``flame_asgi.add_flame_pool(self, "probe", ...)`` for every app that is not a FastAPI;

so the lifespan and middleware-stack wrapping is active in every app the suites build.
``flame_asgi`` (and so the original ``fastapi.FastAPI``) is imported first: ``flame_asgi.FastAPI``
subclasses the original class, never the substitute.

As a script it compares two JUnit XML reports (baseline, patched) and exits non-zero when
a test that passed in the baseline did not pass in the patched run:

    python substitute.py compare SUITE BASELINE.xml PATCHED.xml
"""

from __future__ import annotations

import sys
from typing import Any

if __name__ != "__main__":
    import os

    os.environ["FLAME_UPSTREAM_SUBSTITUTE"] = os.path.dirname(os.path.abspath(__file__))

    import fastapi
    import fastapi.applications
    import starlette.applications

    import flame_asgi  # first: binds flame_asgi.FastAPI to the original fastapi.FastAPI

    ORIGINAL_FASTAPI = fastapi.FastAPI
    ORIGINAL_STARLETTE = starlette.applications.Starlette
    assert flame_asgi.FastAPI.__mro__[1] is ORIGINAL_FASTAPI
    built = {"FastAPI": 0, "Starlette": 0}

    class FastAPI(flame_asgi.FastAPI):
        """``flame_asgi.FastAPI`` with one pool registered, standing in for ``fastapi.FastAPI``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_flame_pool("probe", backend=flame_asgi.LocalBackend())
            built["FastAPI"] += 1

    # Starlette is patched in place, not replaced by a subclass: libraries that patch the
    # class (Sentry replaces ``Starlette.__call__``) must reach every app, as they do without
    # flame_asgi, and ``type(app) is Starlette`` stays true. FastAPI does not run
    # ``Starlette.__init__``; the guard keeps a FastAPI subclass that would to its one pool.
    _starlette_init = ORIGINAL_STARLETTE.__init__

    def _init_with_probe(self: Any, *args: Any, **kwargs: Any) -> None:
        _starlette_init(self, *args, **kwargs)
        if not isinstance(self, ORIGINAL_FASTAPI):
            flame_asgi.add_flame_pool(self, "probe", backend=flame_asgi.LocalBackend())
            built["Starlette"] += 1

    _init_with_probe.__wrapped__ = _starlette_init  # type: ignore[attr-defined]
    ORIGINAL_STARLETTE.__init__ = _init_with_probe  # type: ignore[method-assign]

    # The names tests import FastAPI by; the class keeps the original's name (reprs, docs).
    FastAPI.__module__ = ORIGINAL_FASTAPI.__module__
    fastapi.FastAPI = fastapi.applications.FastAPI = FastAPI  # type: ignore[misc]

    def pytest_report_header(config: Any) -> str:
        return ("flame_asgi substitute: fastapi.FastAPI -> flame_asgi.FastAPI + pool 'probe'; "
                "Starlette.__init__ -> + add_flame_pool 'probe'")

    def pytest_terminal_summary(terminalreporter: Any) -> None:
        terminalreporter.write_line(
            f"flame_asgi substitute: built {built['FastAPI']} FastAPI and {built['Starlette']} Starlette apps "
            "with a probe pool")


def _outcomes(path: str) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    found: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            outcome = "failed"
        elif "skipped" in tags:
            outcome = "skipped"
        else:
            outcome = "passed"
        # A test can appear twice (a call failure and a teardown error): the worse one wins.
        if found.get(test_id) != "failed":
            found[test_id] = outcome
    return found


def _count(outcomes: dict[str, str]) -> str:
    values = list(outcomes.values())
    return ", ".join(f"{values.count(k)} {k}" for k in ("passed", "failed", "skipped"))


def compare(suite: str, baseline_xml: str, patched_xml: str) -> int:
    baseline, patched = _outcomes(baseline_xml), _outcomes(patched_xml)
    regressions = sorted(t for t, o in baseline.items() if o == "passed" and patched.get(t, "missing") != "passed")
    fixed = sorted(t for t, o in patched.items() if o == "passed" and baseline.get(t) not in (None, "passed"))
    for test_id in regressions:
        print(f"  REGRESSION {suite}: {test_id} (patched: {patched.get(test_id, 'missing')})")
    for test_id in fixed:
        print(f"  only-patched-pass {suite}: {test_id} (baseline: {baseline[test_id]})")
    print(f"{suite}: baseline {_count(baseline)}; patched {_count(patched)}; {len(regressions)} regressions")
    return 1 if regressions else 0


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "compare":
        sys.exit(__doc__)
    sys.exit(compare(*sys.argv[2:]))
