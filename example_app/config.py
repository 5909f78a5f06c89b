"""Settings from the environment, read the same way by the web process and its runners.

``ProcessBackend`` runners inherit the parent's environment and working directory, so a
relative ``DATA_DIR`` and the default SQLite file resolve to the same place in both.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sqlalchemy.engine import make_url

MAX_UPLOAD_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path  # uploads/ (shared with runners) and, by default, the SQLite file
    database_url: str  # an async SQLAlchemy URL

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(os.environ.get("DATA_DIR") or "data").resolve()
        url = os.environ.get("DATABASE_URL") or f"sqlite:///{data_dir / 'thumbnails.db'}"
        return cls(data_dir=data_dir, database_url=async_url(url))

    @property
    def uploads(self) -> Path:
        return self.data_dir / "uploads"


def async_url(url: str) -> str:
    """``postgres://`` / ``postgresql://`` → asyncpg, ``sqlite://`` → aiosqlite; others as given."""
    parsed = make_url(url)
    driver = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg",
              "sqlite": "sqlite+aiosqlite"}.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)
