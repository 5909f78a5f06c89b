#!/usr/bin/env bash
# Make the example app's media and browser tools available, idempotently:
#   1. ffmpeg (Debian) when it is missing: the thumbnail runners call it;
#   2. chromium (Debian) when /usr/bin/chromium is missing: tests/test_browser.py drives it;
#   3. postgresql (Debian) when no server is installed: the DATABASE_URL test starts one;
#   4. the Python playwright package when it cannot be imported (it drives that chromium;
#      `playwright install` is never needed: the tests launch /usr/bin/chromium).
# Exits non-zero, with the reason on stderr, when any step fails.
set -euo pipefail

say() { echo "media.sh: $*" >&2; }
PYTHON="${PYTHON:-python}"

packages=()
command -v ffmpeg >/dev/null 2>&1 || packages+=(ffmpeg)
[ -x /usr/bin/chromium ] || packages+=(chromium)
# PostgreSQL for the example app's DATABASE_URL test (Debian keeps initdb off PATH).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || packages+=(postgresql)

if [ "${#packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then say "missing ${packages[*]} and we are not root"; exit 1; fi
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    lock=(); command -v flock >/dev/null 2>&1 && lock=(flock /tmp/apt.lock)
    "${lock[@]}" apt-get update -q >/dev/null || { say "apt-get update failed"; exit 1; }
    "${lock[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
        || { say "apt-get install ${packages[*]} failed"; exit 1; }
fi

if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    say "installing playwright (Python)"
    "$PYTHON" -m pip install -q playwright || { say "pip install playwright failed"; exit 1; }
fi

command -v ffmpeg >/dev/null 2>&1 || { say "ffmpeg is still missing"; exit 1; }
[ -x /usr/bin/chromium ] || { say "/usr/bin/chromium is still missing"; exit 1; }
say "ready: $(ffmpeg -version | head -n 1 | cut -d' ' -f1-3), $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
