"""Opacus DP-SGD wiring for a peft model: per-sample gradients, clipping and noise.

We attach Opacus' grad-sample hooks in place (``wrap_model=False``) so parameter names keep
no ``_module.`` prefix, and build the `DPOptimizer` ourselves instead of calling
`PrivacyEngine.make_private`: our Poisson batches are padded per batch by our own collate
function, which Opacus' `DPDataLoader` cannot reproduce for an empty batch, and accounting
is done over the site's whole history (see `fedllm.privacy.accounting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedllm.errors import ProtectionUnavailableError

__all__ = ["DPSettings", "attach_dp", "detach_dp", "empty_step"]


@dataclass(frozen=True)
class DPSettings:
    """The mechanism one site applies in one round."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    grad_sample_mode: str = "hooks"


def attach_dp(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, settings: DPSettings
) -> tuple[Any, Any]:
    """Attach per-sample-gradient hooks and wrap `optimizer` in Opacus' `DPOptimizer`.

    Raises
    ------
    ProtectionUnavailableError
        If Opacus is missing or cannot compute per-sample gradients for a trainable layer:
        DP was requested, so training without it is never an option.
    """
    try:
        # heavy: opacus takes ~10 s to import; only DP-SGD training needs it
        from opacus.grad_sample.utils import wrap_model
        from opacus.optimizers import DPOptimizer
    except ImportError as e:
        raise ProtectionUnavailableError(
            "record-level DP needs opacus: `pip install 'opacus>=1.6,<1.7'`."
        ) from e
    try:
        # strict=False: rotary-embedding buffers are not trainable and do not mix samples.
        hooks = wrap_model(
            model,
            grad_sample_mode=settings.grad_sample_mode,
            wrap_model=False,
            batch_first=True,
            loss_reduction="mean",
            strict=False,
        )
    except (NotImplementedError, ValueError) as e:
        raise ProtectionUnavailableError(
            f"Opacus cannot compute per-sample gradients for this adapter ({e})."
        ) from e
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=settings.expected_batch_size,
        loss_reduction="mean",
    )
    return hooks, dp_optimizer


def empty_step(dp_optimizer: Any) -> None:
    """Take a DP step on an empty Poisson batch: the accountant counts it, so noise is added."""
    for p in dp_optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    dp_optimizer.step()


def detach_dp(model: torch.nn.Module, hooks: Any) -> None:
    """Remove Opacus' hooks and per-sample buffers so the model is plain again."""
    if hooks is not None and hasattr(hooks, "remove_hooks"):
        hooks.remove_hooks()
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
