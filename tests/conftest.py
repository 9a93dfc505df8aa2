"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Iterator

# One OpenBLAS thread, set before numpy loads: the in-process simulations run the ServerApp
# in a thread beside Ray's workers, and a multi-threaded OpenBLAS call there once spun
# forever (numpy issue #17752); on 2 cores a second BLAS thread buys nothing. Processes the
# tests start inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One torch (OpenMP/MKL) thread per process, set before torch loads; the SuperNodes' ClientApp
# processes and Ray's actors inherit it. The suite runs two workers on two cores, each often
# beside other training processes: torch's default of one thread per core then puts several
# spinning OpenMP teams on each core. Measured with a small MLP (the tiny models' op sizes),
# two processes side by side: 135 steps/s each with two threads, 710 with one; 4-9 against
# 330 while a suite ran beside them. Alone, a second thread gained nothing (760 vs 750).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Under pytest-xdist each worker starts its own Ray clusters: give each its own temp root, so
# two clusters never share a session directory (or its `session_latest` link).
if "PYTEST_XDIST_WORKER" in os.environ:
    _ray_root = pathlib.Path(os.environ.get("RAY_TMPDIR", "/tmp/ray"))
    os.environ["RAY_TMPDIR"] = str(_ray_root / os.environ["PYTEST_XDIST_WORKER"])

# Hypothesis keeps its caches (the constants it mines from the code) under pytest's ignored
# cache folder, not in a `.hypothesis/` beside the checkout; set before its first use.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "hypothesis"),
)

import pytest
from hypothesis import settings

from fedllm.config import parse_config
from fedllm.secure.at_rest import AtRestKey, make_key_file
from fedllm.secure.he import write_key_files
from tests.tiny import make_tiny_model_dir

# The fuzz tests (tests/test_fuzz_*.py) run the same examples on every machine and every run:
# derandomized, no example database (a fresh checkout behaves as this one), no deadline (two
# shared cores make timings noise), and a failure prints the blob that reproduces it.
# FEDLLM_HYPOTHESIS=explore draws fresh random examples, more of them, to hunt for new bugs.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=60, print_blob=True
)
settings.register_profile(
    "explore", derandomize=False, database=None, deadline=None, max_examples=2000, print_blob=True
)
settings.load_profile(os.environ.get("FEDLLM_HYPOTHESIS", "ci"))


@pytest.fixture(scope="module", autouse=True)
def _ray_stops_with_its_module() -> object:
    """`tests.simulate` keeps Ray running between the runs of a module; an idle cluster still
    costs ~0.1 CPU-second a second, so it stops once the module is done."""
    yield
    ray = sys.modules.get("ray")  # never imported here: only where a simulation ran
    if ray is not None and ray.is_initialized():
        ray.shutdown()


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


@pytest.fixture(scope="module")
def at_rest_key(tmp_path_factory: pytest.TempPathFactory) -> AtRestKey:
    """An at-rest key file, made once per module (a fuzz test seals with it many times)."""
    return make_key_file(tmp_path_factory.mktemp("at-rest") / "at-rest.key")


class FlowerLog(logging.Handler):
    """Every record Flower's logger receives (where `flwr run --stream` users read it)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def coordinator_identity() -> Iterator[None]:
    """The ServerApp's task identity, restored after the test. A reply the coordinator
    builds (the streaming mean's, user-level DP's, a robust rule's) is a Flower `Message`,
    which reads it; Flower sets it in a real run, and a test that drives the stages directly
    sets it here rather than rely on one an earlier test left behind."""
    # heavy: tests.inprocess imports both apps; only tests that drive the stages need it
    from tests.inprocess import server_identity

    with server_identity():
        yield


@pytest.fixture
def flwr_log() -> Iterator[FlowerLog]:
    """What Flower's logger receives (where `flwr run --stream` users read it)."""
    handler = FlowerLog()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
