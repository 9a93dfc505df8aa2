"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib

import pytest

from tests.tiny import make_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Return a directory holding a tiny Llama model and chat tokenizer, built offline once."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
