"""The examples of docs/existing-app.md, leases.md and servers.md, run as a reader would:
each ``# file: NAME.py`` block is written to a fresh folder and served by a real server."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import httpx
import pytest
from websockets.sync.client import connect

from tests.servers import serve

DOCS = pathlib.Path(__file__).parent.parent / "docs"
PROCESS = {"FLAME_BACKEND": "process"}


def write_files(page: str, folder: pathlib.Path) -> list[str]:
    text = (DOCS / page).read_text()
    names = []
    for block in re.findall(r"```python\n(# file: (\S+)\n.*?)```", text, re.S):
        body, name = block
        (folder / name).write_text(body)
        names.append(name)
    return names


def test_existing_app_page(tmp_path: pathlib.Path) -> None:
    assert write_files("existing-app.md", tmp_path) == ["shop.py", "gallery.py", "test_gallery.py"]
    env = {**PROCESS, "SHOP_DB": str(tmp_path / "shop.sqlite")}
    with serve("shop:app", env=env, cwd=str(tmp_path), probe="/docs") as (url, _proc, watched):
        got = httpx.get(url + "/revenue", timeout=30).json()
        watched.add(got["computed_in"])
        assert got["revenue"] == 42.5 and got["computed_in"] != got["web"]
    with serve("gallery:app", env=PROCESS, cwd=str(tmp_path), probe="/") as (url, _proc, watched):
        got = httpx.get(url + "/thumbnail/320", timeout=30).json()
        watched.add(got["resized_in"])
        assert got["width"] == 320
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gallery.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_leases_page(tmp_path: pathlib.Path) -> None:
    assert write_files("leases.md", tmp_path) == ["tagger.py"]
    with serve("tagger:app", env=PROCESS, cwd=str(tmp_path), probe="/docs") as (url, _proc, watched):
        tagged = httpx.post(url + "/tag", json=["a b", "c"], timeout=30).json()
        assert [t["tags"] for t in tagged] == [["a", "b"], ["c"]]
        assert {t["model"] for t in tagged} == {"weights of small"} and len({t["pid"] for t in tagged}) == 1
        watched.add(tagged[0]["pid"])
        with connect(url.replace("http", "ws") + "/live", open_timeout=30) as ws:
            ws.send("x y")
            assert json.loads(ws.recv(timeout=30))["tags"] == ["x", "y"]


@pytest.mark.parametrize("server", ["gunicorn"])
def test_servers_page(tmp_path: pathlib.Path, server: str) -> None:
    assert write_files("servers.md", tmp_path) == ["work.py"]
    with serve("work:app", server=server, workers=2, cwd=str(tmp_path), probe="/docs") as (url, _proc, watched):
        got = httpx.get(url + "/where", timeout=30).json()
        watched.add(got["runner"])
        assert got["runner"] != got["worker"]
