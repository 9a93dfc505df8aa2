"""Tests for the server side: Flower strategies over LoRA arrays and the update checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedllm.config import STRATEGIES, parse_config
from fedllm.errors import InvalidUpdateError
from fedllm.strategy.flower import build_inner
from fedllm.validate import check_update
from fedllm.wire import arrays_to_record, record_to_arrays
from tests.replies import mock_reply

B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
B1 = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
EXPECTED = {B0: (4, 2), B1: (3, 2)}


def _reply(
    arrays: dict[str, np.ndarray], num_examples: int, node_id: int, loss: float = 1.0
) -> Message:
    """A train reply as a site sends it (Flower's `create_mock_reply`, without a SuperLink)."""
    content = RecordDict(
        {
            "arrays": arrays_to_record(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )
    return mock_reply(content, node_id=node_id)


def _site_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in EXPECTED.items()}


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_strategy_aggregates_to_the_example_weighted_mean(name: str) -> None:
    """Three replies with 10, 30 and 60 examples average to sum(n_i * w_i) / sum(n_i)."""
    # Prepare
    strategy = build_inner(parse_config({"strategy.name": name}), num_sites=3)
    sites = [(_site_arrays(seed), n) for seed, n in [(1, 10), (2, 30), (3, 60)]]
    losses = [2.0, 3.0, 1.0]
    replies = [
        _reply(arrays, n, node_id=i + 1, loss=losses[i]) for i, (arrays, n) in enumerate(sites)
    ]
    expected = {
        key: (10 * sites[0][0][key] + 30 * sites[1][0][key] + 60 * sites[2][0][key]) / 100
        for key in EXPECTED
    }

    # Execute
    arrays, metrics = strategy.aggregate_train(server_round=1, replies=replies)

    # Assert
    assert isinstance(arrays, ArrayRecord)
    got = record_to_arrays(arrays)
    assert set(got) == set(EXPECTED)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)
    assert metrics is not None
    assert metrics["train-loss"] == pytest.approx((10 * 2.0 + 30 * 3.0 + 60 * 1.0) / 100)


def test_fedavg_of_one_site_is_that_site() -> None:
    """With one site the aggregate is that site's arrays, unchanged."""
    # Prepare
    strategy = build_inner(parse_config({}), num_sites=3)
    arrays = _site_arrays(7)

    # Execute
    aggregated, _ = strategy.aggregate_train(server_round=1, replies=[_reply(arrays, 5, node_id=1)])

    # Assert
    assert aggregated is not None
    for key, value in record_to_arrays(aggregated).items():
        np.testing.assert_allclose(value, arrays[key], rtol=1e-6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_configured_strategy_builds(name: str) -> None:
    """Every name in `STRATEGIES` builds a Flower strategy weighted by `num-examples`."""
    # Prepare
    cfg = parse_config({"strategy.name": name})

    # Execute
    strategy = build_inner(cfg, num_sites=3)

    # Assert
    assert isinstance(strategy, Strategy)
    assert isinstance(strategy, FedAvg)
    assert strategy.weighted_by_key == "num-examples"
    assert strategy.min_train_nodes == cfg.run.min_sites
    assert type(strategy).__name__.lower() == name


def test_fedprox_gets_the_configured_mu() -> None:
    """`strategy.proximal-mu` reaches Flower's FedProx."""
    # Execute
    strategy = build_inner(
        parse_config({"strategy.name": "fedprox", "strategy.proximal-mu": 0.25}), num_sites=2
    )

    # Assert
    assert isinstance(strategy, FedProx)
    assert strategy.proximal_mu == 0.25


# --------------------------------------------------------------------------------------------
# Update checks
# --------------------------------------------------------------------------------------------


def test_check_update_accepts_a_good_update() -> None:
    """A float update with exactly the expected names and shapes passes."""
    # Prepare
    arrays = _site_arrays(0)

    # Execute / Assert (no exception)
    check_update(arrays, EXPECTED, sender="node 7")
    with pytest.raises(InvalidUpdateError, match="dtype float16"):  # float32 only (issue 15)
        half = {k: v.astype(np.float16) for k, v in arrays.items()}
        check_update(half, EXPECTED, sender="node 7")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", f"node 7: update lacks 1 tensors, e.g. '{B1}'."),
        ("extra", "node 7: update carries unexpected tensor 'model.embed_tokens.weight'."),
        ("shape", f"node 7: tensor '{B0}' has shape (2, 4), expected (4, 2)."),
        ("int", f"node 7: tensor '{B0}' has dtype int64."),
        ("nan", f"node 7: tensor '{B1}' holds NaN or infinite values."),
        ("inf", f"node 7: tensor '{B1}' holds NaN or infinite values."),
    ],
)
def test_check_update_refuses_a_bad_update(edit: str, message: str) -> None:
    """Each kind of malformed update is refused, naming the sender and the tensor."""
    # Prepare
    arrays = _site_arrays(0)
    if edit == "missing":
        del arrays[B1]
    elif edit == "extra":
        arrays["model.embed_tokens.weight"] = np.zeros((8, 2), dtype=np.float32)
    elif edit == "shape":
        arrays[B0] = arrays[B0].T.copy()
    elif edit == "int":
        arrays[B0] = np.ones((4, 2), dtype=np.int64)
    else:
        arrays[B1][1, 1] = np.nan if edit == "nan" else -np.inf

    # Execute / Assert
    with pytest.raises(InvalidUpdateError, match=re.escape(message)):
        check_update(arrays, EXPECTED, sender="node 7")
