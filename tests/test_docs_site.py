"""The documentation site: ``mkdocs build --strict`` (a broken link, anchor, include or API
reference fails it), an API reference entry for every name of ``flame_asgi.__all__``, and
the README's links."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

import flame_asgi

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    return out


def reference_entries() -> dict[str, str]:
    """``{identifier: page}`` for every ``::: identifier`` of the API reference."""
    return {match: page.name for page in REFERENCE.glob("*.md")
            for match in re.findall(r"(?m)^::: ([\w.]+)$", page.read_text())}


def resolve(identifier: str) -> object:
    module, _, name = identifier.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_site_builds_strictly(site: pathlib.Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "kubernetes-rbac.yaml").read_text() == (DOCS / "kubernetes-rbac.yaml").read_text()
    # The RBAC manifest is included in the Kubernetes walkthrough, not copied by hand.
    page = (site / "deploy" / "kubernetes" / "index.html").read_text()
    assert "flame-runners" in page and "--8&lt;--" not in page and "--8<--" not in page


def test_every_public_name_is_in_the_api_reference(site: pathlib.Path) -> None:
    entries = reference_entries()
    documented = {identifier.rpartition(".")[2]: identifier for identifier in entries}
    missing = [name for name in flame_asgi.__all__ if name not in documented]
    assert missing == [], (f"add a `::: flame_asgi.NAME` line for each of {missing} to a page of docs/reference/ "
                           "(the page of its group)")
    for name in flame_asgi.__all__:
        identifier = documented[name]
        # The entry documents the very object flame_asgi exports (lazy backends by their module).
        assert resolve(identifier) is getattr(flame_asgi, name), identifier
        html = (site / "reference" / entries[identifier].removesuffix(".md") / "index.html").read_text()
        assert f'id="{identifier}"' in html, f"{identifier} was not rendered on {entries[identifier]}"


def test_every_reference_page_is_listed_in_the_nav() -> None:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(node: object) -> set[str]:
        if isinstance(node, str):
            return {node}
        if isinstance(node, list):
            return set().union(*(pages(n) for n in node))
        if isinstance(node, dict):
            return set().union(*(pages(v) for v in node.values()))
        return set()

    listed = pages(nav)
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk - listed == set(), "add these pages to the nav of mkdocs.yml"
    assert listed - on_disk == set()


def test_the_settings_table_appears_once() -> None:
    # docs/settings.md is generated from flame_asgi/_base/settings.py (tests/test_settings.py): other
    # pages link to it rather than copying it.
    header = "| variable | default | accepts | meaning |"
    holders = [str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if header in p.read_text()]
    assert holders == ["settings.md"]


def test_the_readme_links_resolve_and_reach_every_guide() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links no page of docs/"
    assert [link for link in links if not (ROOT / link).is_file()] == []
    linked = set(links)
    for page in ("docs/reliability.md", "docs/troubleshooting.md", "docs/testing.md", "docs/changelog.md",
                 "docs/deploy/fly.md", "docs/deploy/kubernetes.md", "docs/deploy/docker-compose.md"):
        assert page in linked, page

