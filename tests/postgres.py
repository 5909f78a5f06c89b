"""A throwaway PostgreSQL server on a loopback high port, for the tests that need a real one
(the example app's DATABASE_URL, and its deployment on the Kubernetes cluster)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.example_server import free_port


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a loopback high port (initdb runs as ``postgres``)."""
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin.
    search = os.pathsep.join([os.environ.get("PATH", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))])
    initdb, postgres = shutil.which("initdb", path=search), shutil.which("postgres", path=search)
    assert initdb is not None and postgres is not None, "PostgreSQL is missing although .ci/media.sh ran"
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("PostgreSQL is installed but there is no 'postgres' user to run it as")
    if os.geteuid() != 0:
        pytest.skip("starting PostgreSQL as the 'postgres' user needs root")
    root = Path(tempfile.mkdtemp(prefix="flame-example-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    as_postgres: dict[str, Any] = {"user": user.pw_uid, "group": user.pw_gid, "cwd": root}
    subprocess.run([initdb, "-D", str(root / "data"), "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True, **as_postgres)
    port = free_port()
    with open(root / "postgres.log", "wb") as log:
        proc = subprocess.Popen([postgres, "-D", str(root / "data"), "-p", str(port), "-k", str(root),
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                stdout=log, stderr=subprocess.STDOUT, **as_postgres)
    try:
        deadline = time.monotonic() + 30
        pg_isready = str(Path(os.path.realpath(postgres)).with_name("pg_isready"))
        while subprocess.run([pg_isready, "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{(root / 'postgres.log').read_text()}")
            time.sleep(0.1)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        proc.send_signal(signal.SIGINT)  # "fast" shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(root)
