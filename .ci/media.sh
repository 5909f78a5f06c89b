#!/usr/bin/env bash
# Make the example app's media and browser tools available, idempotently:
#   1. ffmpeg (Debian) when it is missing: the thumbnail runners call it;
#   2. chromium (Debian) when /usr/bin/chromium is missing: tests/test_browser.py drives it;
#   3. postgresql (Debian) when no server is installed: the DATABASE_URL test starts one;
#   4. libatomic1 (Debian) when libatomic.so.1 is missing: playwright's bundled node needs it
#      (present on most machines, not on a minimal Debian);
#   5. the Python playwright package when $PYTHON (default: python) cannot import it (it
#      drives that chromium; `playwright install` is never needed: the tests launch
#      /usr/bin/chromium).
# The test suite runs this itself (the `media` fixture in tests/conftest.py) when a tool is
# missing, so `pip install -e '.[dev]' && python -m pytest` needs no other step.
# Exits non-zero, with the reason on stderr, when any step fails: 3 when the tools cannot be
# installed here (not root, apt or pip failing; the tests then skip, saying why), 1 otherwise.
set -euo pipefail

say() { echo "media.sh: $*" >&2; }
PYTHON="${PYTHON:-python}"

packages=()
command -v ffmpeg >/dev/null 2>&1 || packages+=(ffmpeg)
[ -x /usr/bin/chromium ] || packages+=(chromium)
# PostgreSQL for the example app's DATABASE_URL test (Debian keeps initdb off PATH).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || packages+=(postgresql)
has_libatomic() { "$PYTHON" -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("atomic") is None)'; }
has_libatomic || packages+=(libatomic1)

if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then say "missing ${packages[*]} and we are not root"; exit 3; fi
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    lock=(); command -v flock >/dev/null 2>&1 && lock=(flock /tmp/apt.lock)
    "${lock[@]}" apt-get update -q >/dev/null || { say "apt-get update failed"; exit 3; }
    "${lock[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
        || { say "apt-get install ${packages[*]} failed"; exit 3; }
fi

if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    say "installing playwright (Python) for $PYTHON"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q playwright || { say "pip install playwright failed"; exit 3; }
    elif command -v uv >/dev/null 2>&1; then  # a virtualenv made by uv has no pip
        uv pip install -q --python "$PYTHON" playwright || { say "uv pip install playwright failed"; exit 3; }
    else
        say "$PYTHON has no pip (and there is no uv) to install playwright with"; exit 3
    fi
fi

command -v ffmpeg >/dev/null 2>&1 || { say "ffmpeg is still missing"; exit 1; }
[ -x /usr/bin/chromium ] || { say "/usr/bin/chromium is still missing"; exit 1; }
has_libatomic || { say "libatomic.so.1 is still missing"; exit 1; }
say "ready: $(ffmpeg -version | head -n 1 | cut -d' ' -f1-3), $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
