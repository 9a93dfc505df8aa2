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

from fedllm.config import parse_config
from fedllm.secure.he import write_key_files
from tests.tiny import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Return a directory holding a tiny Llama model and chat tokenizer, built offline once."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def he_keys(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A CKKS key ceremony with the default HE parameters (public and secret context)."""
    out = tmp_path_factory.mktemp("he-keys")
    write_key_files(parse_config({}).he.params, out)
    return out
