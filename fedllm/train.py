"""The local training and evaluation loops a site runs (no Flower imports).

Loss is computed per example (mean over its answer tokens) and then averaged over the batch,
so each example's gradient is well defined for DP-SGD's per-example clipping. Under DP the
logical batch is Poisson-sampled, matching the accountant's assumption, and split into
physical micro-batches that fit in memory.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedllm.config import TrainConfig
from fedllm.data import collate_batch
from fedllm.model import trainable_names
from fedllm.privacy.dpsgd import DPSettings, attach_dp, detach_dp, empty_step

__all__ = [
    "EvalResult",
    "TrainResult",
    "evaluate",
    "example_losses",
    "per_example_loss",
    "train_local",
]

log = logging.getLogger(__name__)

Features = Sequence[dict[str, list[int]]]
Progress = Callable[[int, int, float], None]
# An auditing run's gradient canaries: given the step's RNG, the summed (already clipped)
# canary gradients sampled into this step, by public tensor name (empty: none this step).
CanaryStep = Callable[[np.random.Generator], dict[str, np.ndarray]]


@dataclass(frozen=True)
class TrainResult:
    """What one site's local round produced (losses are per-example means)."""

    mean_loss: float
    steps: int
    examples_seen: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Token-weighted held-out loss, so perplexity = exp(loss) as usual."""

    loss: float
    perplexity: float
    num_examples: int
    num_tokens: int


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's labelled tokens, shape [batch]."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    mask = (shift_labels != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _forward_loss(
    model: torch.nn.Module, features: Features, pad_token_id: int, device: torch.device
) -> torch.Tensor:
    batch = {
        k: v.to(device) for k, v in collate_batch(list(features), pad_token_id=pad_token_id).items()
    }
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_example_loss(logits, batch["labels"])


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def _poisson_batches(n: int, rate: float, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """Each example joins each batch independently with probability `rate` (Poisson sampling)."""
    return [np.flatnonzero(rng.random(n) < rate).tolist() for _ in range(steps)]


def _shuffled_batches(n: int, size: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    order: list[int] = []
    batches = []
    for _ in range(steps):
        if len(order) < min(size, n):
            order = rng.permutation(n).tolist()
        batches.append(order[:size])
        order = order[size:]
    return batches


def train_local(
    model: torch.nn.Module,
    features: Features,
    *,
    cfg: TrainConfig,
    pad_token_id: int,
    device: torch.device,
    dp: DPSettings | None,
    proximal_mu: float = 0.0,
    progress: Progress | None = None,
    seed: int | None = None,
    canaries: CanaryStep | None = None,
) -> TrainResult:
    """Run `cfg.local_steps` optimizer steps on `features`.

    Parameters
    ----------
    dp : DPSettings or None
        DP-SGD settings; None trains without a formal guarantee.
    proximal_mu : float (default: 0.0)
        FedProx (arXiv 1812.06127): after each step the adapter is pulled towards the
        round's global adapter by ``lr * mu * (w - w_global)``. Applied as data-independent
        post-processing so it does not touch the DP analysis.
    seed : int, optional
        Seeds batch sampling, for tests only; by default a fresh OS-random seed is used,
        since predictable Poisson batches would weaken the guarantee.
    canaries : CanaryStep, optional
        An auditing run's gradient canaries: virtual records whose clipped gradients join
        the step's sum before the noise (DP) or the batch mean (no DP).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    optimizer = _make_optimizer(params, cfg)
    rng = np.random.default_rng(secrets.randbits(63) if seed is None else seed)
    n = len(features)
    hooks = None
    if dp is not None:
        hooks, optimizer = attach_dp(model, optimizer, settings=dp)
        batches = _poisson_batches(n, dp.sample_rate, cfg.local_steps, rng)
        if canaries is not None:
            _insert_canaries_before_noise(model, optimizer, canaries, rng)
    else:
        batches = _shuffled_batches(n, cfg.batch_size, cfg.local_steps, rng)
    model.train()
    start = time.monotonic()
    losses: list[float] = []
    seen = 0
    try:
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad()
            if not batch and dp is not None:
                empty_step(optimizer)
            else:
                losses.extend(
                    _accumulate(model, features, batch, cfg, optimizer, pad_token_id, device, dp)
                )
                seen += len(batch)
            if dp is None:
                if canaries is not None:
                    _add_to_grads(model, canaries(rng), scale=1.0 / max(1, len(batch)))
                optimizer.step()
            if anchors:
                with torch.no_grad():
                    for p, a in zip(params, anchors, strict=True):
                        p.sub_(cfg.learning_rate * proximal_mu * (p - a))
            if progress is not None:
                progress(step, len(batches), float(np.mean(losses)) if losses else math.nan)
    finally:
        optimizer.zero_grad()
        if dp is not None:
            detach_dp(model, hooks)
    return TrainResult(
        mean_loss=float(np.mean(losses)) if losses else math.nan,
        steps=len(batches),
        examples_seen=seen,
        seconds=time.monotonic() - start,
    )


def _accumulate(
    model: torch.nn.Module,
    features: Features,
    batch: list[int],
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    pad_token_id: int,
    device: torch.device,
    dp: DPSettings | None,
) -> list[float]:
    """One logical step over micro-batches; returns the per-example losses seen."""
    losses: list[float] = []
    micro = _chunks(batch, cfg.physical_batch_size)
    for i, idx in enumerate(micro):
        per_ex = _forward_loss(model, [features[j] for j in idx], pad_token_id, device)
        losses.extend(per_ex.detach().cpu().tolist())
        if dp is not None:
            # Opacus rescales the per-micro-batch mean into per-example gradients, clips
            # them, and only adds noise on the last micro-batch of the logical batch.
            per_ex.mean().backward()
            optimizer.signal_skip_step(do_skip=i < len(micro) - 1)
            optimizer.step()
            if i < len(micro) - 1:
                optimizer.zero_grad()
        else:
            (per_ex.sum() / len(batch)).backward()
    return losses


def _add_to_grads(model: torch.nn.Module, extra: dict[str, np.ndarray], *, scale: float) -> None:
    names = trainable_names(model)
    with torch.no_grad():
        for p in model.parameters():
            value = extra.get(names.get(id(p), ""))
            if value is not None:
                g = torch.from_numpy(np.asarray(value) * scale).to(p.device, p.dtype)
                p.grad = g.view_as(p) if p.grad is None else p.grad + g.view_as(p)


def _insert_canaries_before_noise(
    model: torch.nn.Module, optimizer: Any, canaries: CanaryStep, rng: np.random.Generator
) -> None:
    """Make Opacus add the step's canary gradients to the clipped sum right before its noise.

    `DPOptimizer.add_noise` runs once per logical step (skipped micro-batches never reach
    it, empty Poisson batches do), on `summed_grad`, the sum of clipped per-example
    gradients: exactly where a real record of norm C would land. Wrapping that one method on
    this instance is the least intrusive place Opacus offers.
    """
    names = trainable_names(model)
    original = optimizer.add_noise

    def add_noise_with_canaries() -> None:
        extra = canaries(rng)
        for p in optimizer.params:
            value = extra.get(names.get(id(p), ""))
            if value is not None:
                p.summed_grad += torch.from_numpy(value).to(p.summed_grad).view_as(p.summed_grad)
        original()

    optimizer.add_noise = add_noise_with_canaries


@torch.no_grad()
def example_losses(
    model: torch.nn.Module,
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> np.ndarray:
    """Each example's mean loss over its answer tokens (membership scores, exposure)."""
    model.eval()
    out: list[float] = []
    for idx in _chunks(range(len(features)), batch_size):
        out.extend(_forward_loss(model, [features[j] for j in idx], pad_token_id, device).tolist())
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    features: Features,
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> EvalResult:
    """Token-weighted mean loss over all labelled tokens of `features`, in batches."""
    model.eval()
    total, tokens = 0.0, 0
    for idx in _chunks(range(len(features)), batch_size):
        batch = collate_batch([features[j] for j in idx], pad_token_id=pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1, :].float().transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        tokens += int((labels != -100).sum())
    mean = total / max(tokens, 1)
    return EvalResult(
        loss=mean,
        perplexity=math.exp(min(mean, 50.0)),
        num_examples=len(features),
        num_tokens=tokens,
    )
