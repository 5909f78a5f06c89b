"""The database: jobs and their thumbnails (SQLAlchemy 2, async engine).

The app's lifespan opens it in the web process *and* in every runner (runner mode still
runs the lifespan), so code running on a runner writes its results itself. SQLite (the
default, one file in ``DATA_DIR``) is shared by the processes of one machine in WAL mode;
set ``DATABASE_URL=postgresql://...`` when runners live elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, LargeBinary, String, event, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)  # naive UTC: the same on SQLite and PostgreSQL


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    filename: Mapped[str] = mapped_column(String(255))
    video_path: Mapped[str | None] = mapped_column(String(1024))  # None: a sample made on the runner
    requested: Mapped[int]  # how many thumbnails were asked for
    status: Mapped[str] = mapped_column(String(16), default="pending")  # running, done, failed, cancelled
    runner_id: Mapped[str | None] = mapped_column(String(64))  # written by the runner that did the work
    duration: Mapped[float | None]  # of the video, in seconds
    error: Mapped[str | None] = mapped_column(String(2000))
    created_at: Mapped[dt.datetime] = mapped_column(default=_now)
    finished_at: Mapped[dt.datetime | None]
    thumbnails: Mapped[list[Thumbnail]] = relationship(
        back_populates="job", order_by="Thumbnail.index", cascade="all, delete-orphan")


class Thumbnail(Base):
    __tablename__ = "thumbnails"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    timestamp: Mapped[float]  # seconds into the video
    width: Mapped[int]
    height: Mapped[int]
    size: Mapped[int]  # bytes of the JPEG
    image: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)  # loaded only to serve it
    job: Mapped[Job] = relationship(back_populates="thumbnails")


def thumbnail_json(t: Thumbnail) -> dict[str, Any]:
    """What the page shows of a thumbnail, live (progress events) and from the list alike."""
    return {"id": t.id, "index": t.index, "timestamp": round(t.timestamp, 3), "width": t.width,
            "height": t.height, "size": t.size, "url": f"/api/thumbnails/{t.id}.jpg"}


def job_json(job: Job) -> dict[str, Any]:
    return {"id": job.id, "filename": job.filename, "status": job.status, "requested": job.requested,
            "runner_id": job.runner_id, "duration": job.duration, "error": job.error,
            "created_at": job.created_at.isoformat() + "Z",
            "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
            "thumbnails": [thumbnail_json(t) for t in job.thumbnails]}


class Database:
    """One engine and its sessions, with the few queries the app needs."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session = async_sessionmaker(self.engine, expire_on_commit=False)

    async def create_tables(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def aclose(self) -> None:
        await self.engine.dispose()

    # -- the web process -------------------------------------------------------------------
    async def add_job(self, job: Job) -> None:
        async with self.session.begin() as s:
            s.add(job)

    async def claim_job(self, job_id: str) -> Job | None:
        """pending → running, once: a job is started by one task only."""
        async with self.session.begin() as s:
            claimed = await s.execute(
                update(Job).where(Job.id == job_id, Job.status == "pending").values(status="running"))
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return await s.get(Job, job_id)

    async def settle_job(self, job_id: str, status: str, error: str | None = None) -> None:
        """End a job the runner could not (it never started, died, or was cut off): if not ended yet."""
        async with self.session.begin() as s:
            await s.execute(update(Job).where(Job.id == job_id, Job.status.in_(("pending", "running")))
                            .values(status=status, error=error and error[:2000], finished_at=_now()))

    async def job(self, job_id: str) -> Job | None:
        async with self.session() as s:
            return await s.scalar(select(Job).options(selectinload(Job.thumbnails)).where(Job.id == job_id))

    async def recent_jobs(self, limit: int = 20) -> Sequence[Job]:
        async with self.session() as s:
            query = (select(Job).options(selectinload(Job.thumbnails))
                     .order_by(Job.created_at.desc()).limit(limit))
            return (await s.scalars(query)).all()

    async def thumbnail_image(self, thumb_id: int) -> bytes | None:
        async with self.session() as s:
            return await s.scalar(select(Thumbnail.image).where(Thumbnail.id == thumb_id))

    # -- the runner ------------------------------------------------------------------------
    async def start_job(self, job_id: str, runner_id: str, duration: float) -> None:
        async with self.session.begin() as s:
            await s.execute(update(Job).where(Job.id == job_id).values(runner_id=runner_id, duration=duration))

    async def add_thumbnail(self, thumbnail: Thumbnail) -> Thumbnail:
        async with self.session.begin() as s:
            s.add(thumbnail)
        return thumbnail

    async def finish_job(self, job_id: str, status: str, error: str | None = None) -> None:
        async with self.session.begin() as s:
            await s.execute(update(Job).where(Job.id == job_id)
                            .values(status=status, error=error and error[:2000], finished_at=_now()))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Several processes (the web process and its runners) write to one file: WAL lets
    # readers and one writer work at once, busy_timeout makes writers queue, not fail.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_current: Database | None = None


@contextlib.asynccontextmanager
async def open_database(url: str) -> AsyncIterator[Database]:
    """Open the database for this process (creating the tables) and close it on exit."""
    global _current
    database = Database(url)
    try:
        await database.create_tables()
        _current = database
        yield database
    finally:
        _current = None
        await database.aclose()


def database() -> Database:
    """The database the lifespan opened in this process (web process or runner)."""
    if _current is None:
        raise RuntimeError("the database is not open: example_app's lifespan opens it")
    return _current
