from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.netns import Netns, ensure_tools

_why_not: list[str | None] = []


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace with a veth link to this one; always removed after."""
    if not _why_not:
        _why_not.append(ensure_tools())
    if _why_not[0] is not None:
        pytest.skip(_why_not[0])
    ns = Netns()
    try:
        ns.create()
        yield ns
    finally:
        ns.destroy()
