"""The flame_asgi showcase: video thumbnails made by ffmpeg on FLAME runners.

- ``main``: the web app (pages, upload, the live WebSocket) and its ``thumbs`` pool;
- ``thumbs``: the remote work, run on a runner (a copy of this app in runner mode);
- ``db``: the SQLAlchemy models and engine, opened by the lifespan on parent and runners;
- ``config``: settings from the environment (``DATA_DIR``, ``DATABASE_URL``).
"""
