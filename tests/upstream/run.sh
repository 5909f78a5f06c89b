#!/usr/bin/env bash
# FastAPI's and Starlette's own test suites, run twice each: as released (baseline) and with
# fastapi.FastAPI / starlette.applications.Starlette replaced by flame_asgi's drop-ins, each
# app carrying one pool (substitute.py). Exits non-zero when a test that passes in the
# baseline does not pass with the substitutes.
#
# Versions: those installed for $PYTHON (FASTAPI_VERSION / STARLETTE_VERSION override them).
# Everything is built in $FLAME_UPSTREAM_WORKDIR (default ${TMPDIR:-/tmp}/flame-upstream),
# outside the repo: a virtualenv with flame_asgi installed editable from this checkout, the
# two sdists (their tests/), the JUnit reports and logs. The baseline depends only on the
# upstream versions and the installed test dependencies, so it is kept and reused while
# those are unchanged; FLAME_UPSTREAM_REBASELINE=1 runs it again.
set -euo pipefail

start=$SECONDS
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
work=${FLAME_UPSTREAM_WORKDIR:-${TMPDIR:-/tmp}/flame-upstream}
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
fastapi_version=${FASTAPI_VERSION:-$(version fastapi)}
starlette_version=${STARLETTE_VERSION:-$(version starlette)}
venv=$work/venv-fastapi-$fastapi_version-starlette-$starlette_version
src=$work/src
results=$work/results
mkdir -p "$work" "$src" "$results"

# Nothing from the caller's environment may switch flame_asgi's behaviour (runner mode,
# a code version, a default backend...): both runs see the same clean FLAME_* slate.
for var in $(compgen -e | grep '^FLAME_' || true); do unset "$var"; done

echo "upstream: fastapi $fastapi_version, starlette $starlette_version; work dir $work"

# -- sources: the sdists' tests, without their package dirs (the installed copies are used)
fetch() {  # name version -> prints the extracted folder
    local dir=$src/$1-$2
    if [[ ! -d $dir/tests ]]; then
        rm -rf "$dir"
        "$venv/bin/pip" download -q --no-deps --no-binary :all: "$1==$2" -d "$src" >&2
        tar xzf "$src/$1-$2.tar.gz" -C "$src"
        [[ -d $dir/tests ]] || { echo "upstream: the $1 $2 sdist has no tests/ folder" >&2; exit 2; }
        rm -rf "${dir:?}/$1"  # so `import $1` can only find the installed package
    fi
    echo "$dir"
}

# -- the virtualenv: flame_asgi (editable), the exact upstream versions, their test deps
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
fastapi_dir=$(fetch fastapi "$fastapi_version")
starlette_dir=$(fetch starlette "$starlette_version")
requirements=$work/requirements.txt
"$venv/bin/python" - "$fastapi_dir/pyproject.toml" "$starlette_dir/pyproject.toml" > "$requirements" <<'EOF'
# The test dependencies both projects declare (FastAPI: group "tests" + extra "all";
# Starlette: group "dev" + extra "full"), less coverage plugins, parallel/pretty runners,
# type checkers and linters, and the two packages themselves (pinned by the caller).
import re, sys, tomllib
SKIP = {"pytest-cov", "pytest-xdist", "pytest-sugar", "mypy", "ty", "ruff", "twine", "types-pyyaml",
        "fastapi", "starlette"}
def group(data, name):
    for item in data["dependency-groups"][name]:
        if isinstance(item, dict):
            yield from group(data, item["include-group"])
        else:
            yield item
for path, grp, extra in zip(sys.argv[1:], ("tests", "dev"), ("all", "full")):
    data = tomllib.load(open(path, "rb"))
    for req in [*group(data, grp), *data["project"]["optional-dependencies"][extra]]:
        if re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-") not in SKIP:
            print(req)
EOF
stamp=$venv/.installed
want="$(cat "$requirements" "$repo/pyproject.toml") $repo $fastapi_version $starlette_version"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    echo "upstream: installing test dependencies into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "fastapi==$fastapi_version" "starlette==$starlette_version" -e "$repo" -r "$requirements"
    printf '%s' "$want" > "$stamp"
fi
# pytest loads substitute.py with -p (before any test module); it then sets
# FLAME_UPSTREAM_SUBSTITUTE=<this folder>, with which every interpreter of the venv imports it
# at startup: the subprocesses some tests start (FastAPI's telemetry tests) get it too.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import os, sys; p = os.environ.get("FLAME_UPSTREAM_SUBSTITUTE"); p and (sys.path.insert(0, p), __import__("substitute"))' \
    > "$site/flame_upstream_substitute.pth"
freeze=$("$venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | sha256sum | cut -c1-12)

# -- the runs
status=0
summary=()
run_suite() {  # name dir pytest-args...
    local name=$1 dir=$2; shift 2
    local baseline=$results/$name-$freeze-baseline.xml patched=$results/$name-patched.xml
    local common=(tests -q -p no:cacheprovider "$@")
    cd "$dir"
    if [[ ! -s $baseline || ${FLAME_UPSTREAM_REBASELINE:-} == 1 ]]; then
        echo "upstream: $name baseline"
        "$venv/bin/python" -m pytest "${common[@]}" --junitxml="$baseline.tmp" > "$results/$name-baseline.log" 2>&1 || true
        [[ -s $baseline.tmp ]] || { tail -20 "$results/$name-baseline.log"; echo "upstream: $name baseline produced no report" >&2; exit 2; }
        mv "$baseline.tmp" "$baseline"
        tail -1 "$results/$name-baseline.log"
    else
        echo "upstream: $name baseline reused ($baseline)"
    fi
    echo "upstream: $name with flame_asgi substituted"
    rm -f "$patched"
    PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} "$venv/bin/python" -m pytest "${common[@]}" -p substitute \
        --junitxml="$patched" > "$results/$name-patched.log" 2>&1 || true
    [[ -s $patched ]] || { tail -20 "$results/$name-patched.log"; echo "upstream: $name patched run produced no report" >&2; exit 2; }
    tail -1 "$results/$name-patched.log"
    local built
    built=$(grep -ho 'built [0-9]* FastAPI and [0-9]* Starlette apps' "$results/$name-patched.log" || true)
    echo "upstream: $name: substitutes ${built:-built nothing}"
    if [[ -z $built || $built == "built 0 FastAPI and 0 Starlette apps" ]]; then
        echo "upstream: $name: no app was built with a probe pool, the patched run proves nothing" >&2
        status=1
    fi
    local out rc=0
    out=$("$venv/bin/python" "$here/substitute.py" compare "$name" "$baseline" "$patched") || rc=$?
    echo "$out"
    summary+=("$(tail -1 <<< "$out")")
    [[ $rc == 0 ]] || status=1
    cd - > /dev/null
}
run_suite starlette "$starlette_dir"
# FastAPI's suite imports its docs examples from docs_src and marks tests for pytest-xdist,
# which is not installed: the marker is registered so --strict-markers accepts it.
PYTHONPATH=./docs_src run_suite fastapi "$fastapi_dir" -o "markers=xdist_group: pytest-xdist grouping (xdist not installed)"

regressions=$(printf '%s\n' "${summary[@]}" | awk '{n += $(NF-1)} END {print n + 0}')
printf '%s\n' "${summary[@]}"
verdict=$([[ $status == 0 ]] && echo OK || echo FAIL)
echo "upstream $verdict: $regressions regressions with flame_asgi substituted (fastapi $fastapi_version, starlette $starlette_version) in $((SECONDS - start))s; reports and logs in $results"
exit $status
