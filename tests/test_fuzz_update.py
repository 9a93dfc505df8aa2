"""Fuzzed site updates (issue 18): whatever a site sends, the coordinator refuses it with one
`InvalidUpdateError` line naming the site and what is wrong, or accepts it only when it is a
valid adapter; it never raises anything else, since one site's garbage must not stop a run."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedllm.errors import InvalidUpdateError
from fedllm.strategy.loop import FederatedRun
from fedllm.validate import WIRE_DTYPE, check_update
from fedllm.wire import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    TRAIN_FIGURES,
    arrays_to_record,
    epsilon_key,
    spend_metrics,
)
from tests.coordinator import seeded_run, train_metrics, train_reply
from tests.replies import mock_reply

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
DTYPES = st.one_of(
    hnp.floating_dtypes(),
    hnp.integer_dtypes(),
    hnp.complex_number_dtypes(),
    st.just(np.dtype(bool)),
    st.just(WIRE_DTYPE),
)
ARRAYS_ANY = st.one_of(
    hnp.arrays(DTYPES, SHAPES),
    hnp.arrays(WIRE_DTYPE, SHAPES, elements=st.floats(width=32)),
)
NAMES = st.sampled_from(["q.lora_B.weight", "v.lora_B.weight", "q.lora_A.weight", "embed.weight"])


def _norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None) -> float:
    return math.sqrt(
        sum(
            float(np.sum(np.square(a - (0 if reference is None else reference[n]), dtype=float)))
            for n, a in arrays.items()
        )
    )


# -- the pure check -----------------------------------------------------------------------------
@given(
    st.dictionaries(NAMES, SHAPES, min_size=1, max_size=3),
    st.dictionaries(NAMES, ARRAYS_ANY, max_size=4),
    st.floats(),
    st.booleans(),
)
@example(  # float32's largest values: finite, but an L2 norm far past any bound
    {"q.lora_B.weight": (2, 2)},
    {"q.lora_B.weight": np.full((2, 2), np.finfo(np.float32).max, dtype=np.float32)},
    1e5,
    True,
)
def test_a_fuzzed_update_is_refused_naming_the_site_or_is_a_valid_adapter(
    expected: dict[str, tuple[int, ...]],
    arrays: dict[str, np.ndarray],
    max_norm: float,
    with_reference: bool,
) -> None:
    """Random names (missing, extra), shapes, dtypes, NaN and infinities, huge norms."""
    reference = (
        {n: np.full(s, 0.5, dtype=WIRE_DTYPE) for n, s in expected.items()}
        if with_reference
        else None
    )
    try:
        check_update(arrays, expected, sender="site 7", reference=reference, max_norm=max_norm)
    except InvalidUpdateError as e:
        assert len(str(e).splitlines()) == 1 and str(e).startswith("site 7: "), e
        return
    assert set(arrays) == set(expected)
    for name, shape in expected.items():
        assert arrays[name].shape == shape and arrays[name].dtype == WIRE_DTYPE
        assert np.all(np.isfinite(arrays[name]))
    assert _norm(arrays, reference) <= max_norm


_FIGURE = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.floats(), max_size=3),
)
_SPEND_KEYS = [
    SITE,
    "noise-multiplier",
    "sample-rate",
    "steps",
    "max-grad-norm",
    "delta",
    *(epsilon_key(m) for m in ("rdp", "prv", "pld")),
    "spent-rounds",
    "spent-sigma",
    "spent-q",
    "spent-steps",
]


@given(st.dictionaries(st.sampled_from(_SPEND_KEYS), _FIGURE))
def test_a_fuzzed_spend_is_refused_or_read_as_typed_finite_values(metrics: dict[str, Any]) -> None:
    """A site's reported DP-SGD spend goes into the run's ledger: nothing malformed may."""
    try:
        spend = spend_metrics(metrics, sender="site 3")
    except InvalidUpdateError as e:
        assert len(str(e).splitlines()) == 1 and str(e).startswith("site 3: "), e
        return
    if spend is None:
        assert epsilon_key("prv") not in metrics
        return
    assert isinstance(spend["site"], int) and spend["site"] >= 0
    assert isinstance(spend["steps"], int) and spend["steps"] >= 0
    floats = [spend[k] for k in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta")]
    assert all(math.isfinite(v) for v in [*floats, *spend["epsilons"].values()])


# -- the coordinator's stages, with real replies ------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FederatedRun:
    """A built coordinator run (no DP, run.min-sites 1) whose three sites reported 100
    training examples before round 1."""
    return seeded_run(tiny_model_dir, tmp_path_factory.mktemp("fuzz-update"))


@st.composite
def broken_arrays(draw: st.DrawFn, run: FederatedRun) -> ArrayRecord:
    """The global adapter + 0.01 with one fault: a tensor dropped, one added, or one
    replaced by an array of another shape or dtype, with a non-finite value, or far past
    the norm bound."""
    good = {n: a + np.float32(0.01) for n, a in run.ctx.arrays.items()}
    name = draw(st.sampled_from(sorted(good)))
    fault = draw(st.sampled_from(["drop", "extra", "shape", "dtype", "nan", "norm"]))
    if fault == "drop":
        del good[name]
    elif fault == "extra":  # a base weight, or any name (a line break in it forged log lines)
        extra = draw(
            st.sampled_from(["model.embed_tokens.weight", "a\nfedllm: forged"]) | st.text()
        )
        good[extra] = np.zeros((2, 2), np.float32)
    elif fault == "shape":
        good[name] = draw(hnp.arrays(WIRE_DTYPE, SHAPES.filter(lambda s: s != good[name].shape)))
    elif fault == "dtype":
        good[name] = good[name].astype(draw(DTYPES.filter(lambda d: d != WIRE_DTYPE)))
    elif fault == "nan":
        flat = good[name].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    else:
        good[name] = good[name] + np.float32(draw(st.floats(1e5, 3e38)))
    return arrays_to_record(good)


def _bad_reply(arrays: ArrayRecord, metrics: dict[str, Any]) -> Message:
    return mock_reply(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(metrics)}), node_id=2)


def _npz(value: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, value=value)
    return out.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """An .npy header declaring `shape` of float32, and no data after it."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


@st.composite
def broken_metrics(draw: st.DrawFn) -> dict[str, Any]:
    """A non-DP site's train figures with one of them missing or replaced by a value of
    the wrong kind (NaN, infinite, negative, a list, a float count), or a weight past the
    site's own count (100) or the ceiling."""
    metrics = train_metrics(1)
    key = draw(st.sampled_from(sorted(TRAIN_FIGURES)))
    if draw(st.booleans()):
        del metrics[key]
        return metrics
    kind = TRAIN_FIGURES[key]
    wrong = {
        "count": st.one_of(st.integers(max_value=-1), st.floats(), st.lists(st.integers())),
        "finite": st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf]), st.lists(st.floats())
        ),
        "number": st.one_of(st.just(math.nan), st.lists(st.floats(), min_size=1)),
    }[kind]
    if key == NUM_EXAMPLES:
        wrong = st.one_of(wrong, st.just(0), st.integers(101, 2**63 - 1))
    if key == SITE:  # a site number that is a count but names another site is not a fault here
        wrong = wrong.filter(lambda v: not isinstance(v, int))
    metrics[key] = draw(wrong)
    return metrics


def _aggregate_with(run: FederatedRun, bad: Message) -> list[dict[str, Any]]:
    """Sites 0 and 2 send good updates and `bad` comes from site 1: the round aggregates
    the good ones; returns the rejections this round added."""
    assert run.strategy is not None
    rejected = run.ctx.book.data.setdefault("rejected", [])
    before = len(rejected)
    arrays, _ = run.strategy.aggregate_train(1, [train_reply(run, 0), bad, train_reply(run, 2)])
    assert arrays is not None
    return rejected[before:]


@given(data=st.data())
def test_a_reply_with_a_broken_adapter_is_rejected_and_the_round_goes_on(
    run: FederatedRun, data: st.DataObject
) -> None:
    # Prepare
    bad = _bad_reply(data.draw(broken_arrays(run)), train_metrics(1))
    # Execute
    rejections = _aggregate_with(run, bad)
    # Assert
    assert len(rejections) == 1, rejections
    reason = rejections[0]["reason"]
    assert rejections[0]["site"] == 1 and len(reason.splitlines()) == 1, reason


@given(
    data=st.binary(max_size=64),
    dtype=st.sampled_from(["float32", "<f4", "float64", "garbage", ""]),
    shape=st.lists(st.integers(0, 2**31), max_size=3).map(tuple),
    stype=st.sampled_from(["numpy.ndarray", "tenseal.ckks_vector", "torch.tensor"]),
)
# The first four stopped the coordinator's round with a traceback: numpy's reader raised
# EOFError (no bytes), BadZipFile (a zip header), MemoryError (a header declaring 3.6 TiB),
# or loaded an .npz archive (then AttributeError); a cut header was already a rejection.
@example(data=b"", dtype="float32", shape=(16, 8), stype="numpy.ndarray")
@example(data=b"PK\x03\x04junk", dtype="float32", shape=(16, 8), stype="numpy.ndarray")
@example(data=_npy_header((10**12,)), dtype="float32", shape=(16, 8), stype="numpy.ndarray")
@example(
    data=_npz(np.zeros((16, 8), np.float32)), dtype="float32", shape=(16, 8), stype="numpy.ndarray"
)
@example(data=b"\x93NUMPY\x01\x00\xff\xff", dtype="float32", shape=(16, 8), stype="numpy.ndarray")
def test_a_tensor_whose_bytes_are_no_numpy_array_is_rejected_and_the_round_goes_on(
    run: FederatedRun, data: bytes, dtype: str, shape: tuple[int, ...], stype: str
) -> None:
    # Prepare
    arrays = arrays_to_record({n: a + np.float32(0.01) for n, a in run.ctx.arrays.items()})
    name = sorted(arrays)[0]
    arrays[name] = Array(dtype=dtype, shape=shape, stype=stype, data=data)
    # Execute
    rejections = _aggregate_with(run, _bad_reply(arrays, train_metrics(1)))
    # Assert
    assert len(rejections) == 1, rejections
    reason = rejections[0]["reason"]
    assert reason.startswith("site 1 (node 2): ") and name in reason, reason
    assert len(reason.splitlines()) == 1, reason


@given(metrics=broken_metrics())
def test_a_reply_with_broken_figures_is_rejected_and_the_round_goes_on(
    run: FederatedRun, metrics: dict[str, Any]
) -> None:
    # Prepare
    arrays = arrays_to_record({n: a + np.float32(0.01) for n, a in run.ctx.arrays.items()})
    # Execute
    rejections = _aggregate_with(run, _bad_reply(arrays, metrics))
    # Assert
    assert len(rejections) == 1, (metrics, rejections)
    assert len(rejections[0]["reason"].splitlines()) == 1
