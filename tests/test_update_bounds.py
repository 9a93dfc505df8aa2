"""An update can neither overflow nor outweigh the aggregate (issue 15, items 6-8): its
tensors in the declared dtype and within an L2 norm bound, its weight positive and no more
than the site's own count fixed before round 1, and under HE the weight checked against
that fixed count, not against what the same reply claims."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm.errors import InvalidUpdateError
from fedllm.secure.he import payload_digest
from fedllm.secure.he_site import SiteHE
from fedllm.strategy.loop import FederatedRun
from fedllm.wire import ARRAYS, HE, HE_WEIGHT, METRICS, ciphertexts_to_record
from tests.coordinator import (
    TRAIN_EXAMPLES,
    he_settings,
    seeded_run,
    train_metrics,
    train_reply,
)
from tests.replies import mock_reply

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages


def _rejections(run: FederatedRun, replies: list[Message]) -> list[str]:
    assert run.strategy is not None
    arrays, _ = run.strategy.aggregate_train(1, replies)
    assert arrays is not None  # the other sites' updates were aggregated
    return [r["reason"] for r in run.ctx.book.data.get("rejected", [])]


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda a: {n: v.astype(np.float64) for n, v in a.items()}, "dtype float64"),
        (lambda a: {n: np.full(v.shape, 1e300) for n, v in a.items()}, "dtype float64"),
        (lambda a: {n: v + 1e4 for n, v in a.items()}, "L2 norm"),
    ],
    ids=["float64", "float64-overflow", "huge-norm"],
)
def test_an_update_outside_the_declared_dtype_or_norm_bound_is_rejected(
    tiny_model_dir: Path, tmp_path: Path, make: Any, named: str
) -> None:
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path)
    bad = make({n: a.copy() for n, a in run.ctx.arrays.items()})
    replies = [train_reply(run, 0), train_reply(run, 1, arrays=bad), train_reply(run, 2)]
    # Execute
    reasons = _rejections(run, replies)
    # Assert
    assert len(reasons) == 1 and named in reasons[0] and "site 1" in reasons[0]


def test_the_norm_bound_is_recorded_in_the_summary(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = seeded_run(tiny_model_dir, tmp_path, **{"validate.max-update-norm": 5.0})
    assert run.summary()["validation"]["max_update_norm"] == 5.0


@pytest.mark.parametrize(
    ("num_examples", "named"),
    [
        (-9, "num-examples"),
        (0, "num-examples"),
        (10 * TRAIN_EXAMPLES, "reported 100 before round 1"),
    ],
    ids=["negative", "zero", "ten-times-its-own"],
)
def test_a_weight_that_is_not_positive_or_exceeds_the_sites_own_count_is_rejected(
    tiny_model_dir: Path, tmp_path: Path, num_examples: int, named: str
) -> None:
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path)
    replies = [
        train_reply(run, 0),
        train_reply(run, 1, num_examples=num_examples),
        train_reply(run, 2),
    ]
    # Execute
    reasons = _rejections(run, replies)
    # Assert
    assert len(reasons) == 1 and named in reasons[0]


def test_a_site_with_no_count_before_round_1_is_held_to_the_ceiling(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path, **{"validate.max-examples": 1000})
    del run.ctx.book.data["evals"]["0"]["2"]
    replies = [train_reply(run, 0), train_reply(run, 1), train_reply(run, 2, num_examples=5000)]
    # Execute
    reasons = _rejections(run, replies)
    # Assert
    assert len(reasons) == 1 and "validate.max-examples = 1000" in reasons[0]


# -- under HE ----------------------------------------------------------------------------------
def _heseeded_run(tiny_model_dir: Path, tmp_path: Path, keys: Path) -> FederatedRun:
    return seeded_run(tiny_model_dir, tmp_path, **he_settings(keys))


def _sealed(run: FederatedRun, site: int, num_examples: int, weight: float) -> Message:
    he = SiteHE.load(run.cfg, run.cfg.he.site_context, site=site)
    blobs = he.seal({n: a + 0.01 for n, a in run.ctx.arrays.items()}, weight=weight, num_sites=3)
    content = RecordDict(
        {
            ARRAYS: ciphertexts_to_record(blobs),
            METRICS: MetricRecord({**train_metrics(site, num_examples), HE_WEIGHT: weight}),
            HE: ConfigRecord({"key-id": he.key, "sha256": payload_digest(blobs)}),
        }
    )
    return mock_reply(content, node_id=site + 1)


def test_under_he_a_site_claiming_more_examples_than_before_round_1_is_rejected(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path
) -> None:
    """Its weight matches its own claim (1000 over the unit of 300), but its share is 100."""
    # Prepare
    run = _heseeded_run(tiny_model_dir, tmp_path, he_keys)
    he = run.pipeline.stage("he-sum")
    he.open_round()
    unit = 3 * TRAIN_EXAMPLES
    replies = [
        _sealed(run, 0, TRAIN_EXAMPLES, TRAIN_EXAMPLES / unit),
        _sealed(run, 1, 1000, 1000 / unit),
        _sealed(run, 2, TRAIN_EXAMPLES, TRAIN_EXAMPLES / unit),
    ]
    # Execute
    reasons = _rejections(run, replies)
    # Assert
    assert len(reasons) == 1 and "site 1" in reasons[0]
    assert he.divisor == pytest.approx(2 / 3)


@pytest.mark.parametrize("factor", [2.0, 0.5, 1.05], ids=["double", "half", "five-percent-more"])
def test_under_he_a_weight_other_than_the_sites_public_share_is_rejected(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path, factor: float
) -> None:
    """A site that claims its true count but weights its ciphertexts by anything other than
    its public share (count / the unit fixed before round 1) is left out, by name, and the
    divisor sent to the sites counts only the shares that were added."""
    # Prepare
    run = _heseeded_run(tiny_model_dir, tmp_path, he_keys)
    he = run.pipeline.stage("he-sum")
    he.open_round()
    share = TRAIN_EXAMPLES / (3 * TRAIN_EXAMPLES)
    replies = [
        _sealed(run, 0, TRAIN_EXAMPLES, share),
        _sealed(run, 1, TRAIN_EXAMPLES, share * factor),
        _sealed(run, 2, TRAIN_EXAMPLES, share),
    ]
    # Execute
    reasons = _rejections(run, replies)
    # Assert
    assert len(reasons) == 1 and "site 1" in reasons[0] and "weight" in reasons[0]
    assert he.divisor == pytest.approx(2 * share)


def test_under_he_a_false_count_reported_later_does_not_move_the_weight_unit(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path
) -> None:
    """A site that reports a negative training-set size when evaluating round 1 cannot move
    the honest sites' public weights (here to 100 / 50 each): the unit is fixed before
    round 1."""
    # Prepare
    run = _heseeded_run(tiny_model_dir, tmp_path, he_keys)
    for site, count in ((0, 100), (1, 100), (2, -150)):
        run.ctx.book.record("evals", 1, site, {"train-examples": count})
    he = run.pipeline.stage("he-sum")
    # Execute
    unit = he.weight_unit()
    # Assert
    assert unit == 3 * TRAIN_EXAMPLES


def test_a_site_refuses_a_decrypted_global_with_values_past_the_norm_bound(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path
) -> None:
    """What a site decrypts is checked before it trains on it."""
    # Prepare
    run = _heseeded_run(tiny_model_dir, tmp_path, he_keys)
    he = SiteHE.load(run.cfg, run.cfg.he.site_context, site=0)
    huge = {n: np.full(a.shape, 50.0, np.float32) for n, a in run.ctx.arrays.items()}
    blobs = he.seal(huge, weight=1.0, num_sites=1)
    # Execute / Assert
    with pytest.raises(InvalidUpdateError, match="norm"):
        he.open_global(blobs, divisor=1.0, server_key=he.key, max_norm=100.0)


def test_a_site_refuses_to_seal_values_the_sum_could_wrap_past_the_first_prime(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path
) -> None:
    """The wrap is real: eight contributions TenSEAL encrypts without complaint sum, under
    the default chain, past the first prime's headroom and decrypt to garbage (which the
    check slot catches). A site refuses to seal such values for a sum of eight, naming the
    first prime, and seals those just inside the limit, whose sum decrypts exactly."""
    # Prepare
    from fedllm.errors import ProtectionUnavailableError
    from fedllm.secure.he import EncryptedSum, encrypt_chunks

    run = _heseeded_run(tiny_model_dir, tmp_path, he_keys)
    he = SiteHE.load(run.cfg, run.cfg.he.site_context, site=0)
    sites = 8
    limit = run.cfg.he.params.max_sum_magnitude / sites  # what one site may send

    def filled(value: float) -> dict[str, np.ndarray]:
        return {n: np.full(a.shape, value, np.float32) for n, a in run.ctx.arrays.items()}

    def summed(blobs: list[bytes]) -> dict[str, np.ndarray]:
        total = EncryptedSum(he.ctx, he.key, he.packing.chunk_sizes)
        for site in range(sites):
            total.add(
                blobs, weight=1.0, key=he.key, digest=payload_digest(blobs), sender="s", site=site
            )
        return he.open_global(total.blobs(), divisor=total.weight, server_key=he.key)  # mean

    # Execute
    bypassed = encrypt_chunks(he.ctx, he.packing.pack(filled(3 * limit), 1.0))
    inside = summed(he.seal(filled(0.97 * limit), weight=1.0, num_sites=sites))
    # Assert: past the limit the sum wraps, garbling every slot (the check slot too)
    with pytest.raises(InvalidUpdateError, match="integrity check"):
        summed(bypassed)
    with pytest.raises(ProtectionUnavailableError, match="first prime"):
        he.seal(filled(3 * limit), weight=1.0, num_sites=sites)
    assert all(np.allclose(a, 0.97 * limit, rtol=1e-6) for a in inside.values())
