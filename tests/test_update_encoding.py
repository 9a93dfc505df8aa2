"""Smaller updates (issue 19): a site's update travels as float16 or blockwise absmax int8
(`strategy.update-encoding`), encoded at the site after every privacy mechanism and before
its signature, decoded by the coordinator before anything uses it; any other encoding, or
a malformed one, is rejected with one line naming the site."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedllm import wire
from fedllm.config import config_hash, parse_config, stable_dict
from fedllm.errors import ConfigError, InvalidUpdateError, ProtectionUnavailableError
from fedllm.model import adapter_spec
from fedllm.mods import DistributedDPMod, EncodeMod, train_mods
from fedllm.quantize import decode_fp16, decode_int8, encode_fp16, encode_int8, num_blocks
from fedllm.secure.pki import PkiLayout, init_pki
from fedllm.secure.sign import content_digest
from fedllm.site_replay import REPLY_FILE, ReplyStore, StoredReply
from fedllm.strategy.pipeline import STAGES
from tests.coordinator import seeded_run, signed_settings, train_metrics
from tests.inprocess import run_in_process
from tests.replies import mock_reply

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages

# The quickstart's update: FFA-LoRA (r = 8 on q_proj and v_proj) sends B only, for each of
# SmolLM2-135M's 30 layers: q_proj B (576, 8), v_proj B (192, 8) (3 KV heads x 64).
QUICKSTART = {
    f"layers.{i}.self_attn.{m}.lora_B.weight": (out, 8)
    for i in range(30)
    for m, out in (("q_proj", 576), ("v_proj", 192))
}
QUICKSTART_FP32_BYTES = 744960  # per site per round (benchmarks/results/quickstart_flwr_run.json)


def _random(shape: tuple[int, ...], seed: int = 0, scale: float = 1e-3) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# -- the maths -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "block"), [((1000,), 64), ((7, 13), 8), ((576, 8), 64), ((3,), 64), ((0,), 64)]
)
def test_int8_error_is_at_most_half_a_step_of_each_blocks_absmax(
    shape: tuple[int, ...], block: int
) -> None:
    """|x - decoded| <= absmax / 127 / 2 in every block, sizes not divisible by the block
    included (the last block is short)."""
    # Prepare
    x = _random(shape, scale=1.0)
    x.ravel()[: min(block, x.size)] *= 1e-3  # one block far smaller than the rest
    # Execute
    codes, scales = encode_int8(x, block=block)
    decoded = decode_int8(codes, scales, block=block)
    # Assert
    assert codes.dtype == np.int8 and codes.shape == x.shape
    assert scales.dtype == np.float32 and scales.shape == (num_blocks(x.size, block),)
    for b in range(scales.size):
        part = slice(b * block, (b + 1) * block)
        assert scales[b] == np.abs(x.ravel()[part]).max()
        error = np.abs(decoded.ravel()[part] - x.ravel()[part]).max()
        assert error <= scales[b] / 127 / 2 * (1 + 1e-9)


def test_a_block_of_zeros_has_scale_zero_and_decodes_to_zeros() -> None:
    # Prepare
    x = np.zeros(100, np.float32)
    x[70] = -0.5
    # Execute
    codes, scales = encode_int8(x, block=64)
    # Assert
    assert scales.tolist() == [0.0, 0.5]
    assert codes[70] == -127 and not codes[:64].any()
    np.testing.assert_array_equal(decode_int8(codes, scales, block=64), x)


def test_fp16_round_trip_is_float16_rounding_and_out_of_range_is_refused() -> None:
    # Prepare
    x = _random((64, 8), scale=0.1)
    # Execute
    decoded = decode_fp16(encode_fp16(x))
    # Assert
    np.testing.assert_allclose(decoded, x, rtol=2**-11, atol=2**-25)
    with pytest.raises(InvalidUpdateError, match="beyond float16's range"):
        encode_fp16(np.array([7e4], np.float32), name="b")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_nan_or_inf_is_refused_not_encoded(scheme: str, bad: float) -> None:
    # Prepare
    x = np.array([0.1, bad, 0.2], np.float32)
    # Execute / Assert
    with pytest.raises(InvalidUpdateError, match="'b' holds NaN or infinite values"):
        encode_fp16(x, name="b") if scheme == "fp16" else encode_int8(x, block=64, name="b")


@pytest.mark.parametrize(
    ("codes", "scales", "match"),
    [
        (np.zeros(10, np.int16), np.zeros(1, np.float32), "codes have dtype int16"),
        (np.full(10, -128, np.int8), np.ones(1, np.float32), "-128"),
        (np.zeros(10, np.int8), np.ones(2, np.float32), r"scales have shape \(2,\), expected"),
        (np.zeros(10, np.int8), np.ones(1, np.float64), "scales have dtype float64"),
        (np.zeros(10, np.int8), np.array([np.nan], np.float32), "NaN, infinite or negative"),
        (np.zeros(10, np.int8), np.array([-1.0], np.float32), "NaN, infinite or negative"),
    ],
    ids=["codes-dtype", "code-128", "scales-shape", "scales-dtype", "nan-scale", "neg-scale"],
)
def test_malformed_int8_is_refused(codes: np.ndarray, scales: np.ndarray, match: str) -> None:
    with pytest.raises(InvalidUpdateError, match=match):
        decode_int8(codes, scales, block=64)


# -- config --------------------------------------------------------------------------------
def test_an_encoding_under_he_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="CKKS ciphertexts, which are not quantised") as e:
        parse_config({"strategy.secure-aggregation": "he", "strategy.update-encoding": "int8"})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("strategy.update-encoding", "int4", "int4"), ("strategy.quantization-block", 4, ">= 8")],
)
def test_an_unknown_encoding_or_a_tiny_block_is_refused(key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({key: value})


def test_the_default_keeps_the_config_hash_of_runs_made_before_the_keys() -> None:
    # Execute
    default, encoded = parse_config({}), parse_config({"strategy.update-encoding": "int8"})
    # Assert
    assert not {"update_encoding", "quantization_block"} & set(stable_dict(default)["strategy"])
    assert config_hash(default) != config_hash(encoded)


def test_decode_sits_after_the_signature_and_spends_and_before_validation() -> None:
    """The signature covers the encoded bytes; a site whose update is rejected still has its
    spend recorded (as with validation); every check further in sees a plain adapter."""
    names = [s.name for s in STAGES]
    assert names.index("spends") + 1 == names.index("decode") < names.index("validate")
    assert names.index("signatures") < names.index("decode")


# -- the site's mod ------------------------------------------------------------------------
def _instruction(global_arrays: dict[str, np.ndarray]) -> Message:
    """The coordinator's train request for round 1 carrying `global_arrays`."""
    content = {
        wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1}),
        wire.ARRAYS: wire.arrays_to_record(global_arrays),
    }
    return mock_reply(RecordDict(content), node_id=0)


def _context(**run_config: Any) -> Context:
    node = {"partition-id": 0, "num-partitions": 1}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run_config)


def _handler(trained: dict[str, np.ndarray]) -> Callable[[Message, Context], Message]:
    def handler(msg: Message, context: Context) -> Message:
        content = {wire.ARRAYS: wire.arrays_to_record(trained), wire.METRICS: MetricRecord({})}
        return Message(content=RecordDict(content), reply_to=msg)

    return handler


def test_the_encode_mod_sits_outside_distributed_dp_on_the_train_function() -> None:
    """It encodes the update after the distributed-DP noise share is added."""
    assert [type(m) for m in train_mods({})] == [EncodeMod, DistributedDPMod]


def test_under_fp32_the_encode_mod_sends_the_adapter_as_trained() -> None:
    # Prepare
    glob = {"b": np.zeros((4, 8), np.float32)}
    trained = {"b": _random((4, 8))}
    # Execute
    reply = EncodeMod()(_instruction(glob), _context(), _handler(trained))
    # Assert
    assert wire.ENCODING not in reply.content.config_records
    arr = reply.content[wire.ARRAYS]["b"]
    assert arr.data == Array.from_numpy_ndarray(trained["b"]).data


def test_the_encode_mod_sends_int8_codes_of_the_update_and_declares_them() -> None:
    # Prepare
    glob = {"b": _random((96, 8), seed=1, scale=0.1)}
    trained = {"b": glob["b"] + _random((96, 8))}
    # Execute
    reply = EncodeMod({"strategy.update-encoding": "int8"})(
        _instruction(glob), _context(), _handler(trained)
    )
    # Assert
    record = reply.content[wire.ARRAYS]
    assert sorted(record) == ["b", "b#absmax"]
    assert record["b"].dtype == "int8" and list(record["b"].shape) == [96, 8]
    assert record["b#absmax"].dtype == "float32" and list(record["b#absmax"].shape) == [12]
    assert dict(reply.content[wire.ENCODING]) == {"scheme": "int8", "base": "global", "block": 64}


def test_the_encode_mod_refuses_ciphertexts() -> None:
    # Prepare
    msg = _instruction({})
    msg.content[wire.ARRAYS] = wire.ciphertexts_to_record([b"x"])
    # Execute / Assert
    with pytest.raises(ProtectionUnavailableError, match="handed ciphertexts"):
        EncodeMod({"strategy.update-encoding": "fp16"})(msg, _context(), _handler({}))


def test_a_replayed_reply_is_encoded_to_the_same_bytes(tmp_path: Path) -> None:
    """The site stores its reply before the mods run; replayed through the store, the same
    adapter is encoded (and so signed) identically."""
    # Prepare
    glob = {n: _random(s, seed=1, scale=0.1) for n, s in list(QUICKSTART.items())[:4]}
    trained = {n: a + _random(a.shape, seed=2) for n, a in glob.items()}
    store = ReplyStore(path=tmp_path / REPLY_FILE, key=None)
    store.save("d" * 64, StoredReply(arrays=trained, metrics={"num-examples": 1}, spend=None))
    replayed = store.load("d" * 64)
    assert replayed is not None
    mod = EncodeMod({"strategy.update-encoding": "int8"})
    # Execute
    fresh = mod(_instruction(glob), _context(), _handler(trained))
    again = mod(_instruction(glob), _context(), _handler(replayed.arrays))
    # Assert
    assert content_digest(fresh.content) == content_digest(again.content)


@pytest.mark.parametrize(("scheme", "most"), [("int8", 0.30), ("fp16", 0.51)])
def test_a_quickstart_update_is_at_most_this_share_of_its_fp32_bytes(
    scheme: str, most: float
) -> None:
    # Prepare
    glob = {n: np.zeros(s, np.float32) for n, s in QUICKSTART.items()}
    trained = {n: _random(s, seed=i) for i, (n, s) in enumerate(QUICKSTART.items())}
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record(trained)})
    fp32 = wire.record_bytes(content[wire.ARRAYS])
    # Execute
    wire.encode_update(content, glob, scheme=scheme, block=64)
    # Assert
    assert fp32 == QUICKSTART_FP32_BYTES
    assert wire.record_bytes(content[wire.ARRAYS]) <= most * fp32


# -- the coordinator's stage ---------------------------------------------------------------
def _encoded_reply(run: Any, site: int, scheme: str, **record: Any) -> Message:
    """Site `site`'s train reply as EncodeMod sends it (its update: the global + 0.01·noise)."""
    trained = {n: a + _random(a.shape, seed=site, scale=0.01) for n, a in run.ctx.arrays.items()}
    content = RecordDict(
        {
            wire.ARRAYS: wire.arrays_to_record(trained),
            wire.METRICS: MetricRecord(train_metrics(site)),
        }
    )
    if scheme != "fp32":
        wire.encode_update(content, run.ctx.arrays, scheme=scheme, block=record.pop("block", 64))
    return mock_reply(content, node_id=site + 1)


def _aggregate(run: Any, replies: Any) -> Any:
    """Round 1's aggregate of `replies` (a stream), as the ServerApp runs it."""
    return run.strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_an_encoded_round_aggregates_within_the_quantisation_error(
    scheme: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    plain = seeded_run(tiny_model_dir, tmp_path / "p")
    encoded = seeded_run(tiny_model_dir, tmp_path / "e", **{"strategy.update-encoding": scheme})
    # Execute
    want, _ = _aggregate(plain, (_encoded_reply(plain, s, "fp32") for s in range(3)))
    got, _ = _aggregate(encoded, (_encoded_reply(encoded, s, scheme) for s in range(3)))
    # Assert: each update moved at most 0.04 per value (4 sigma of 0.01); int8 errs by
    # at most its block's absmax / 254, fp16 by its relative rounding
    assert not encoded.ctx.book.data.get("rejected")
    want_arrays, got_arrays = wire.record_to_arrays(want), wire.record_to_arrays(got)
    for name, value in want_arrays.items():
        assert got_arrays[name].dtype == np.float32
        np.testing.assert_allclose(got_arrays[name], value, atol=0.06 / 254 + 1e-6)
    assert encoded.pipeline.summary_sections()["update_encoding"]["encoding"] == scheme
    assert plain.pipeline.summary_sections()["update_encoding"] == {"encoding": "fp32"}


def _first(reply: Message, *, scales: bool = False) -> str:
    """The first tensor's codes (or, with `scales`, its scales) in an int8 reply."""
    names = [n for n in reply.content[wire.ARRAYS] if n.endswith("#absmax") == scales]
    return names[0]


def _replace(reply: Message, name: str, value: np.ndarray) -> None:
    reply.content[wire.ARRAYS][name] = Array.from_numpy_ndarray(value)


def _codes_as_int16(reply: Message) -> None:
    name = _first(reply)
    _replace(reply, name, wire.record_to_arrays(reply.content[wire.ARRAYS])[name].astype(np.int16))


def _nan_scales(reply: Message) -> None:
    name = _first(reply, scales=True)
    shape = wire.record_to_arrays(reply.content[wire.ARRAYS])[name].shape
    _replace(reply, name, np.full(shape, np.nan, np.float32))


def _declare(**fields: Any) -> Callable[[Message], None]:
    def declare(reply: Message) -> None:
        reply.content[wire.ENCODING] = ConfigRecord({**reply.content[wire.ENCODING], **fields})

    return declare


def _undeclared(reply: Message) -> None:
    """What an fp32 site sends: its adapter as trained, no ENCODING record."""
    del reply.content[wire.ENCODING]


HOSTILE: dict[str, tuple[Callable[[Message], None], str]] = {
    "codes-dtype": (_codes_as_int16, "codes have dtype int16, expected int8"),
    "scales-shape": (
        lambda r: _replace(r, _first(r, scales=True), np.ones(3, np.float32)),
        "scales have shape (3,), expected",
    ),
    "nan-scale": (_nan_scales, "scales hold NaN"),
    "block-size": (
        _declare(block=32),
        "int8 update in blocks of 32; this run's strategy.quantization-block is 64",
    ),
    "tensor-missing": (
        lambda r: r.content[wire.ARRAYS].pop(_first(r, scales=True)),
        "int8 update lacks array",
    ),
    "fp32-reply": (
        _undeclared,
        "sent an fp32 update; this run's strategy.update-encoding is 'int8'",
    ),
    "fp16-declared": (
        _declare(scheme="fp16"),
        "sent an update encoded 'fp16'; this run's strategy.update-encoding is 'int8'",
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_malformed_int8_reply_is_rejected_in_one_line_naming_the_site(
    attack: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path, **{"strategy.update-encoding": "int8"})
    hostile = _encoded_reply(run, 0, "int8")
    spoil, reason = HOSTILE[attack]
    spoil(hostile)
    replies = [hostile, _encoded_reply(run, 1, "int8")]
    # Execute
    arrays, _ = _aggregate(run, iter(replies))
    # Assert
    (rejected,) = run.ctx.book.data["rejected"]
    assert rejected["sender"] == "site 0 (node 1)" and rejected["round"] == 1
    assert rejected["reason"].startswith("site 0 (node 1): ") and reason in rejected["reason"]
    assert "\n" not in rejected["reason"]
    assert arrays is not None and set(run.ctx.book.round("trains", 1)) == {"1"}


@pytest.mark.parametrize("declared", ["int8", "fp32"])
def test_an_encoding_record_in_an_fp32_run_is_rejected(
    declared: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Whatever it declares ('fp32' included: int8 codes under it would otherwise pass for
    a plain adapter's name set), an fp32 run's reply carries no encoding record."""
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path)
    hostile = _encoded_reply(run, 0, "int8")
    _declare(scheme=declared)(hostile)
    replies = [hostile, _encoded_reply(run, 1, "fp32")]
    # Execute
    _aggregate(run, iter(replies))
    # Assert
    (rejected,) = run.ctx.book.data["rejected"]
    assert rejected["reason"] == (
        f"site 0 (node 1): sent an update declared encoded {declared!r}; this run's "
        "strategy.update-encoding is 'fp32' (adapters as trained)."
    )
    assert set(run.ctx.book.round("trains", 1)) == {"1"}


# -- a real federated run ------------------------------------------------------------------
def test_a_signed_int8_run_completes_with_a_fraction_of_the_upload_bytes(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ServerApp and ClientApp, mods included: every site signs its int8 update,
    the coordinator verifies the signature over the encoded bytes and decodes them."""
    # Prepare
    monkeypatch.chdir(tmp_path)
    pki = PkiLayout(tmp_path / "pki")
    init_pki(pki.root, hosts=["localhost"], sites=[f"site-{k}" for k in range(2)])
    common = {
        "model.name": str(tiny_model_dir),
        "run.output-dir": str(tmp_path / "out"),
        "run.rounds": 2,
        "run.min-sites": 2,
        "train.local-steps": 1,
        "train.batch-size": 8,
        "eval.max-examples": 8,
        **signed_settings(pki),
    }
    # Execute
    run_in_process({**common, "run.name": "r", "strategy.update-encoding": "int8"}, sites=2)
    # Assert
    summary = json.loads((tmp_path / "out" / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and not summary["rejected_updates"]
    assert summary["update_encoding"] == {
        "encoding": "int8",
        "block": 64,
        "scales": "float32 absmax per block",
        "encodes": "the update: each site's adapter minus the round's global adapter",
    }
    assert sorted(summary["security"]["verified"]["2"]["train"]) == [0, 1]
    # what travelled is what was counted: the encoded bytes (on the tiny model's small
    # tensors the .npy headers weigh more than on a real adapter, so the share is larger)
    cfg = parse_config(common)
    zeros = {n: np.zeros(cfg_shape, np.float32) for n, cfg_shape in _sent_shapes(cfg).items()}
    content = RecordDict({wire.ARRAYS: wire.arrays_to_record(zeros)})
    fp32 = wire.record_bytes(content[wire.ARRAYS])
    wire.encode_update(content, zeros, scheme="int8", block=64)
    up = [b["up"] for b in summary["bytes_per_round"] if b["round"] > 0]
    assert up == [2 * wire.record_bytes(content[wire.ARRAYS])] * 2
    assert up[0] < 0.7 * 2 * fp32
    # the global adapter moved by decoded updates and stayed a working model
    assert summary["eval_loss"][-1] < 1.05 * summary["eval_loss"][0]


def _sent_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    spec = adapter_spec(cfg.model, cfg.lora)
    return {n: spec.shapes[n] for n in spec.sent}
