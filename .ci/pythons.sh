#!/usr/bin/env bash
# The other Pythons pyproject.toml allows (requires-python >= 3.11; the main run is on 3.11):
# for each interpreter in $FLAME_PYTHONS (default: pyenv's 3.12.1 and 3.13.0), a fresh
# virtualenv (uv) with the newest dependencies, `-e '.[dev]'`, then the core, observability,
# reliability and example-app tests in it (the backends', the browser's and the slow ones are
# left to the main run). Every interpreter is tried even when one fails.
# Extra arguments go to pytest (e.g. `.ci/pythons.sh -x tests/test_pool.py`).
# Exits non-zero when an interpreter is missing, or an install or any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

PYTHON="${PYTHON:-python}"  # the one that runs uv
PYENV_VERSIONS="${PYENV_ROOT:-$HOME/.pyenv}/versions"
FLAME_PYTHONS="${FLAME_PYTHONS:-$PYENV_VERSIONS/3.12.1/bin/python $PYENV_VERSIONS/3.13.0/bin/python}"
say() { echo "pythons.sh: $*" >&2; }

"$PYTHON" -m uv --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q uv
uv() { "$PYTHON" -m uv "$@"; }  # `python -m uv pip` targets that python unless told --python

venvs=()
trap 'rm -rf "${venvs[@]}"' EXIT
failed=()
for interpreter in $FLAME_PYTHONS; do
    start=$SECONDS
    if ! version="$("$interpreter" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')"; then
        say "$interpreter cannot run"; failed+=("$interpreter (missing)"); continue
    fi
    venv="$(mktemp -d "${TMPDIR:-/tmp}/flame-py$version.XXXXXX")"
    venvs+=("$venv")
    say "Python $version: installing -e '.[dev]' into $venv"
    if ! { uv venv -q --python "$interpreter" "$venv" && uv pip install -q --python "$venv/bin/python" -e '.[dev]'; }; then
        say "Python $version: the install failed"; failed+=("$version (install)"); continue
    fi
    status=0
    "$venv/bin/python" -m pytest -p no:cacheprovider -q -rfE \
        --ignore=tests/backends --ignore=tests/test_browser.py -m 'not slow' "$@" || status=$?
    say "Python $version: exit status $status in $(( SECONDS - start )) s"
    [ "$status" = 0 ] || failed+=("$version (tests: exit status $status)")
done
if [ "${#failed[@]}" -gt 0 ]; then
    say "failed: ${failed[*]}"
    exit 1
fi
say "all passed: $FLAME_PYTHONS"
