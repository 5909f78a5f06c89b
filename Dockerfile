# The showcase app (example_app) as one image for the web process *and* its runners:
# DockerBackend(image=None) boots runners from the image the web process runs,
# KubernetesBackend from the parent Pod's image and FlyBackend from FLY_IMAGE_REF, so
# both sides always run the same code (FLAME_BACKEND=docker|kubernetes|fly picks one).
#   docker build -t flame-thumbs .
#   docker run --rm -p 8000:8000 -v "$PWD/data:/data" flame-thumbs   # runners: local processes
# See docs/tutorial.md ("Deploying") for container runners.
# PYTHON_IMAGE: another base with Python 3.11 on PATH (.ci/kubernetes-images.sh builds one
# where Docker Hub cannot be reached).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# ffmpeg for the runners' work (and the sample videos they generate), and ffprobe for the
# web process, which checks that an upload is a video before it boots anything.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data
WORKDIR /app

# The library and the app's dependencies first: this layer is reused while only the app changes.
COPY pyproject.toml README.md ./
COPY flame_asgi ./flame_asgi
RUN pip install '.[example,docker,kubernetes]'
COPY example_app ./example_app

RUN mkdir -p /data
VOLUME ["/data"]
EXPOSE 8000
# sh -c expands $PORT (Fly, PaaS) and $HOST (a host-network Pod binds its node's address);
# exec makes uvicorn replace the shell, so it gets SIGTERM itself.
CMD ["sh", "-c", "exec python -m uvicorn example_app.main:app --host ${HOST:-0.0.0.0} --port ${PORT:-8000}"]
