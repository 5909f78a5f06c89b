#!/usr/bin/env bash
# The lowest versions pyproject.toml allows, tested: a fresh virtualenv (uv) with every direct
# dependency at its lower bound (`--resolution lowest-direct`) and the transitive ones pinned by
# tests/constraints-lowest.txt, then the core, observability, reliability and example-app tests
# in it (the backends', the browser's, the docs pages' and the slow ones are left to the main
# run: they test services, prose and endurance rather than version ranges, and would double the
# time; about 5 min on 2 busy cores).
#   1. install uv for $PYTHON (default: python) when it is missing;
#   2. make the virtualenv in a temporary directory (removed on exit);
#   3. check that what got installed is what pyproject.toml and the constraints file declare:
#      each direct dependency exactly at its lower bound (else a bound is not the tested one);
#   4. run the tests there.
# Extra arguments go to pytest (e.g. `.ci/lowest.sh -x tests/test_pool.py`).
# Exits non-zero when the install, the check or any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

PYTHON="${PYTHON:-python}"
CONSTRAINTS=tests/constraints-lowest.txt
say() { echo "lowest.sh: $*" >&2; }
start=$SECONDS

"$PYTHON" -m uv --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q uv
uv() { "$PYTHON" -m uv "$@"; }  # `python -m uv pip` targets that python unless told --python

venv="$(mktemp -d "${TMPDIR:-/tmp}/flame-lowest.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
uv venv -q --python "$("$PYTHON" -c 'import sys; print(sys.executable)')" "$venv"
say "installing the lowest versions into $venv"
uv pip install -q --python "$venv/bin/python" --resolution lowest-direct -e '.[dev]' -c "$CONSTRAINTS"
say "installed in $(( SECONDS - start )) s"

# Every direct dependency (the package's and its dev extra's) must sit at its declared lower
# bound, and the constraints file must pin it there too. (No `packaging` in that virtualenv:
# the requirements are parsed by hand; they are all `name[extras]>=version[; extra == "x"]`.)
"$venv/bin/python" - "$CONSTRAINTS" <<'PY'
import importlib.metadata as metadata
import re
import sys


def key(version: str) -> tuple[object, ...]:  # 0.40 == 0.40.0
    parts: list[object] = [int(p) if p.isdigit() else p for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


pins = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        pins[canonical(name)] = version.strip()
wrong = []
for text in metadata.requires("flame_asgi") or []:
    requirement, _, marker = (part.strip() for part in text.partition(";"))
    extras = re.findall(r"""extra\s*==\s*['"]([^'"]+)['"]""", marker)
    if extras and "dev" not in extras:
        continue
    name = canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group())
    low = re.search(r">=\s*([^,;\s]+)", requirement)
    installed = metadata.version(name)
    if low is None:
        wrong.append(f"{requirement}: no lower bound in pyproject.toml")
    elif key(installed) != key(low.group(1)):
        wrong.append(f"{requirement}: {installed} installed, not the lower bound")
    elif name not in pins or key(pins[name]) != key(installed):
        wrong.append(f"{requirement}: {sys.argv[1]} pins {pins.get(name, 'nothing')}")
if wrong:
    print("lowest.sh: the declared lower bounds are not the ones tested:\n  " + "\n  ".join(wrong), file=sys.stderr)
    sys.exit(1)
print(f"lowest.sh: every direct dependency at its lower bound (Python {sys.version.split()[0]})", file=sys.stderr)
PY

tests_start=$SECONDS
status=0
"$venv/bin/python" -m pytest -p no:cacheprovider -q -rfE \
    --ignore=tests/backends --ignore=tests/test_browser.py --ignore=tests/test_docs_pages.py -m 'not slow' "$@" \
    || status=$?
say "tests took $(( SECONDS - tests_start )) s (all: $(( SECONDS - start )) s), exit status $status"
exit "$status"
