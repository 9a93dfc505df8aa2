"""Tests for fedllm.privacy.dpsgd and the DP path of fedllm.train on a real peft LoRA model.

The first test is the guard the architecture notes ask for: an Opacus/peft pairing once silently
corrupted LoRA gradients (Opacus issue #820), so DP-SGD with no noise and no effective clipping
must reproduce the plain gradients exactly.
"""

from __future__ import annotations

import math
import pathlib

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedllm.config import LoraConfig, ModelConfig, TrainConfig
from fedllm.data import collate_batch, tokenize_examples
from fedllm.model import attach_lora, get_adapter_arrays, load_base_model, set_adapter_arrays
from fedllm.privacy.config import GRAD_SAMPLE_MODES
from fedllm.privacy.dpsgd import DPSettings, attach_dp, detach_dp
from fedllm.train import evaluate, per_example_loss, train_local

CPU = torch.device("cpu")

# Opacus' hooks sit on LoRA layers whose inputs need no gradient (the base model is frozen), so
# torch notes the full backward hook fires on outputs only; that is what Opacus expects.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

PAIRS = [
    ("What is AI?", "Artificial Intelligence is a branch of science."),
    ("Hello there", "Hi, how are you?"),
    ("Do you like music?", "Yes, I love jazz a lot."),
    ("What is your name?", "I am a bot."),
    ("Tell me a joke", "Why did the robot go on vacation? To recharge."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Can you cook?", "I cannot cook, but I know many recipes."),
    ("Good morning", "Good morning to you too."),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: pathlib.Path) -> PreTrainedTokenizerBase:
    """Return the tiny offline chat tokenizer."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def features(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, list[int]]]:
    """Eight chat-formatted examples with the loss on the answers only."""
    ds = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _ in PAIRS],
            "response": [r for _, r in PAIRS],
            "category": ["chat"] * len(PAIRS),
        }
    )
    feats = tokenize_examples(ds, tokenizer, max_length=256)
    assert len(feats) == len(PAIRS)
    return feats


@pytest.fixture
def model_cfg(tiny_model_dir: pathlib.Path) -> ModelConfig:
    """Point `model.name` at the tiny offline Llama."""
    return ModelConfig(name=str(tiny_model_dir))


def _model(model_cfg: ModelConfig, lora: LoraConfig) -> torch.nn.Module:
    """A LoRA model part-way through training: shared-seed A, non-zero B (so A gets gradient)."""
    model = attach_lora(load_base_model(model_cfg, CPU), lora, seed=0)
    rng = np.random.default_rng(1)
    arrays = {
        name: (rng.normal(size=value.shape) * 0.1).astype(np.float32)
        if ".lora_B." in name
        else np.array(value, copy=True)
        for name, value in get_adapter_arrays(model).items()
    }
    set_adapter_arrays(model, arrays)
    return model


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, batch["labels"]).mean()


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    # An explicit copy, so a snapshot never depends on how get_adapter_arrays builds arrays.
    return {n: np.array(a, copy=True) for n, a in get_adapter_arrays(model).items()}


# --------------------------------------------------------------------------------------------
# (a) DP gradients equal plain gradients without noise and clipping (Opacus issue #820)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("ffa", [True, False], ids=["ffa-lora", "plain-lora"])
def test_dp_gradients_without_noise_or_clipping_equal_plain_gradients(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    ffa: bool,
    mode: str,
) -> None:
    """σ=0 and an unreachable clip norm: the DP gradient of every LoRA tensor is the plain one,
    in every per-sample gradient mode `privacy.grad-sample-mode` offers."""
    # Prepare
    lora = LoraConfig(ffa=ffa)
    batch = collate_batch(features[:4], pad_token_id=tokenizer.pad_token_id)
    plain, private = _model(model_cfg, lora), _model(model_cfg, lora)
    optimizer = torch.optim.SGD(list(_trainable(private).values()), lr=0.1)
    settings = DPSettings(
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        sample_rate=0.5,
        expected_batch_size=4,
        grad_sample_mode=mode,
    )
    hooks, dp_optimizer = attach_dp(private, optimizer, settings=settings)

    # Execute
    _loss(plain, batch).backward()
    _loss(private, batch).backward()
    stepped = dp_optimizer.pre_step()
    detach_dp(private, hooks)

    # Assert
    assert stepped is True
    expected, got = _trainable(plain), _trainable(private)
    assert list(got) == list(expected)
    assert len(got) == (4 if ffa else 8)
    for name, param in expected.items():
        assert param.grad is not None and param.grad.abs().max() > 1e-5, name
        torch.testing.assert_close(got[name].grad, param.grad, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# (b) Per-example clipping
# --------------------------------------------------------------------------------------------


def test_dp_gradient_norm_is_at_most_the_clip_norm(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """With σ=0 and C=1e-3 each example's gradient is clipped, so their mean has norm <= C."""
    # Prepare
    clip = 1e-3
    batch = collate_batch(features[:4], pad_token_id=tokenizer.pad_token_id)
    model = _model(model_cfg, LoraConfig(ffa=False))
    params = list(_trainable(model).values())
    settings = DPSettings(
        noise_multiplier=0.0, max_grad_norm=clip, sample_rate=0.5, expected_batch_size=4
    )
    hooks, dp_optimizer = attach_dp(model, torch.optim.SGD(params, lr=0.1), settings=settings)
    _loss(model, batch).backward()
    per_example_norms = torch.stack(
        [p.grad_sample.reshape(4, -1).norm(dim=1) for p in params], dim=1
    ).norm(dim=1)
    plain_norm = torch.cat([p.grad.reshape(-1) for p in params]).norm()

    # Execute
    dp_optimizer.pre_step()
    detach_dp(model, hooks)

    # Assert
    dp_norm = torch.cat([p.grad.reshape(-1) for p in params]).norm()
    assert per_example_norms.shape == (4,)
    assert bool((per_example_norms > clip).all())  # clipping is active for every example
    assert plain_norm > clip
    assert 0 < dp_norm <= clip


# --------------------------------------------------------------------------------------------
# (c) train_local learns, with and without DP, and leaves a plain model behind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "dp"])
def test_train_local_reduces_the_training_loss(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    private: bool,
) -> None:
    """Ten steps at a high learning rate (σ=0 under DP) lower the loss on the training examples."""
    # Prepare
    model = attach_lora(load_base_model(model_cfg, CPU), LoraConfig(), seed=0)
    hooks_before = _hook_count(model)
    cfg = TrainConfig(local_steps=10, batch_size=4, physical_batch_size=4, learning_rate=0.05)
    dp = (
        DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4)
        if private
        else None
    )
    pad = tokenizer.pad_token_id
    before = evaluate(model, features, batch_size=8, pad_token_id=pad, device=CPU).loss

    # Execute
    result = train_local(model, features, cfg=cfg, pad_token_id=pad, device=CPU, dp=dp, seed=0)

    # Assert
    after = evaluate(model, features, batch_size=8, pad_token_id=pad, device=CPU).loss
    assert result.steps == 10
    assert result.examples_seen > 0
    assert math.isfinite(result.mean_loss)
    assert after < before - 0.02
    for name, param in _trainable(model).items():
        assert type(param) is torch.nn.Parameter, name
        assert not hasattr(param, "grad_sample"), name
        assert not hasattr(param, "summed_grad"), name
    assert _hook_count(model) == hooks_before


def test_dp_micro_batches_give_the_plain_full_batch_step(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """One SGD step over all 8 examples in micro-batches of 2: DP (σ=0, no clip) equals plain."""
    # Prepare
    lora = LoraConfig(ffa=False)
    plain, private = _model(model_cfg, lora), _model(model_cfg, lora)
    start = _snapshot(plain)
    cfg = TrainConfig(
        local_steps=1, batch_size=8, physical_batch_size=2, learning_rate=1.0, optimizer="sgd"
    )
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, expected_batch_size=8)
    pad = tokenizer.pad_token_id

    # Execute
    train_local(plain, features, cfg=cfg, pad_token_id=pad, device=CPU, dp=None, seed=0)
    train_local(private, features, cfg=cfg, pad_token_id=pad, device=CPU, dp=dp, seed=0)

    # Assert
    want, got = _snapshot(plain), _snapshot(private)
    for name, value in want.items():
        assert not np.allclose(value, start[name], atol=1e-6), name  # the step moved it
        np.testing.assert_allclose(got[name], value, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# (d) Empty Poisson batches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "moves"), [(1.0, True), (0.0, False)])
def test_empty_poisson_batches_still_take_a_noisy_step(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    sigma: float,
    moves: bool,
) -> None:
    """Batches with no example train without error; the noise alone moves the adapter."""
    # Prepare
    model = attach_lora(load_base_model(model_cfg, CPU), LoraConfig(), seed=0)
    start = _snapshot(model)
    cfg = TrainConfig(local_steps=2, batch_size=4, physical_batch_size=4, learning_rate=0.05)
    dp = DPSettings(
        noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=1e-12, expected_batch_size=4
    )

    # Execute
    result = train_local(
        model,
        features,
        cfg=cfg,
        pad_token_id=tokenizer.pad_token_id,
        device=CPU,
        dp=dp,
        seed=0,
    )

    # Assert
    assert result.steps == 2
    assert result.examples_seen == 0
    assert math.isnan(result.mean_loss)
    end = _snapshot(model)
    changed = [not np.array_equal(end[n], start[n]) for n in start]
    assert changed == [moves] * len(start)
    assert all(np.isfinite(a).all() for a in end.values())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_empty_batch_noise_has_the_calibrated_scale(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """One SGD step (lr=1) on an empty batch moves B by Gaussian noise of std σ·C / B."""
    # Prepare
    torch.manual_seed(0)
    model = attach_lora(load_base_model(model_cfg, CPU), LoraConfig(), seed=0)
    start = _snapshot(model)
    cfg = TrainConfig(
        local_steps=1, batch_size=4, physical_batch_size=4, learning_rate=1.0, optimizer="sgd"
    )
    dp = DPSettings(
        noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=1e-12, expected_batch_size=4
    )

    # Execute
    train_local(
        model, features, cfg=cfg, pad_token_id=tokenizer.pad_token_id, device=CPU, dp=dp, seed=0
    )

    # Assert
    moved = np.concatenate([(a - start[n]).ravel() for n, a in _snapshot(model).items()])
    assert moved.size == 768
    assert abs(float(moved.mean())) < 0.05
    assert float(moved.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.15)


# --------------------------------------------------------------------------------------------
# (e) Gradient canaries (white-box audit)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("private", [True, False])
def test_gradient_canaries_join_the_step_like_one_more_clipped_record(
    model_cfg: ModelConfig,
    features: list[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    private: bool,
) -> None:
    """With σ = 0, one SGD step with a canary gradient v differs from the same step without
    it by exactly −lr·v/B: the canary lands where a clipped record would (DP: in Opacus'
    summed clipped gradient before noise; no DP: in the batch mean)."""
    # Prepare
    lora = LoraConfig(ffa=True)
    cfg = TrainConfig(
        local_steps=1, batch_size=8, physical_batch_size=4, learning_rate=1.0, optimizer="sgd"
    )
    dp = (
        DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0, expected_batch_size=8)
        if private
        else None
    )
    pad = tokenizer.pad_token_id
    with_canary, without = _model(model_cfg, lora), _model(model_cfg, lora)
    rng = np.random.default_rng(5)
    v = {n: rng.normal(size=a.shape) for n, a in get_adapter_arrays(with_canary).items()}

    # Execute
    train_local(without, features, cfg=cfg, pad_token_id=pad, device=CPU, dp=dp, seed=0)
    train_local(
        with_canary,
        features,
        cfg=cfg,
        pad_token_id=pad,
        device=CPU,
        dp=dp,
        seed=0,
        canaries=lambda _rng: v,
    )

    # Assert
    a, b = _snapshot(with_canary), _snapshot(without)
    for name, value in a.items():
        np.testing.assert_allclose(value - b[name], -v[name] / 8, atol=1e-5, rtol=1e-4)
