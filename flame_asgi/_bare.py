"""The app a ProcessBackend runner boots when its pool has no app of its own.

``async with FlamePool(..., backend=ProcessBackend())`` outside any app still needs a
copy of *something* to run: this is an empty flame_asgi app, which in runner mode
serves only the internal endpoints.
"""

from flame_asgi._asgi.app import FastAPI

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
