"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

# One OpenBLAS thread, set before numpy loads: the in-process simulations run the ServerApp
# in a thread beside Ray's workers, and a multi-threaded OpenBLAS call there once spun
# forever (numpy issue #17752); on 2 cores a second BLAS thread buys nothing. Processes the
# tests start inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from tests.tiny import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Return a directory holding a tiny Llama model and chat tokenizer, built offline once."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
