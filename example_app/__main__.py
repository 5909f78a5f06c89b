"""``python -m example_app``: serve the showcase on $HOST:$PORT (127.0.0.1:8000) with uvicorn."""

import os

import uvicorn

if __name__ == "__main__":
    uvicorn.run("example_app.main:app", host=os.environ.get("HOST", "127.0.0.1"),
                port=int(os.environ.get("PORT", "8000")))
