"""What a site does with its private data, independent of Flower: prepare, train, evaluate.

The ClientApp (`clients/app.py`) only translates Flower records to and from these calls.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedllm.config import FedllmConfig, ModelConfig
from fedllm.data import load_examples, partition_examples, split_train_eval, tokenize_examples
from fedllm.errors import BudgetExceededError, DataError
from fedllm.model import (
    attach_lora,
    get_adapter_arrays,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_model_dir,
    set_adapter_arrays,
)
from fedllm.privacy.accounting import (
    History,
    calibrate_noise,
    default_delta,
    epsilon,
    total_steps,
)
from fedllm.privacy.dpsgd import DPSettings
from fedllm.train import EvalResult, TrainResult, evaluate, train_local

__all__ = [
    "PrivacyState",
    "SiteData",
    "SiteRound",
    "load_site_data",
    "run_evaluate",
    "run_train",
    "site_data_for",
    "tokenizer_for",
]

log = logging.getLogger(__name__)

Features = list[dict[str, list[int]]]


@dataclass
class SiteData:
    """One site's tokenized private examples; they never leave the site."""

    site: int
    train: Features
    eval: Features
    categories: list[str]


def load_site_data(cfg: FedllmConfig, *, site: int, num_sites: int, tokenizer: object) -> SiteData:
    """Partition the configured source and keep this site's share, split train/held-out."""
    if not 0 <= site < num_sites:
        raise DataError(f"site index {site} is outside 0..{num_sites - 1}; fix 'partition-id'.")
    examples = load_examples(
        cfg.data.source,
        prompt_field=cfg.data.prompt_field,
        response_field=cfg.data.response_field,
        category_field=cfg.data.category_field or None,
    )
    parts = partition_examples(
        examples,
        num_sites=num_sites,
        scheme=cfg.data.partitioner,
        seed=cfg.run.seed,
        alpha=cfg.data.dirichlet_alpha,
    )
    train_ds, eval_ds = split_train_eval(
        parts[site],
        eval_fraction=cfg.data.eval_fraction,
        max_eval_examples=cfg.eval.max_examples,
        seed=cfg.run.seed,
    )
    train = tokenize_examples(train_ds, tokenizer, max_length=cfg.data.max_length)
    held_out = tokenize_examples(eval_ds, tokenizer, max_length=cfg.data.max_length)
    if not train or not held_out:
        raise DataError(
            f"site {site} has no usable examples after tokenization "
            f"(train {len(train)}, held-out {len(held_out)}); raise 'data.max-length'."
        )
    return SiteData(
        site=site, train=train, eval=held_out, categories=sorted(set(parts[site]["category"]))
    )


@dataclass
class PrivacyState:
    """A site's DP-SGD history over the whole run; persisted so ε stays cumulative."""

    history: History = field(default_factory=list)
    delta: float = 0.0
    noise_multiplier: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "history": self.history,
                "delta": self.delta,
                "noise_multiplier": self.noise_multiplier,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyState:
        raw = json.loads(text)
        return cls(
            history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
            delta=float(raw["delta"]),
            noise_multiplier=float(raw["noise_multiplier"]),
        )

    def save(self, path: Path) -> None:
        """Atomic and fsync'd: a crash leaves either the old or the new state, never half."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PrivacyState:
        return cls.from_json(path.read_text(encoding="utf-8")) if path.is_file() else cls()


@dataclass(frozen=True)
class SiteRound:
    """A site's reply to one training round."""

    arrays: dict[str, np.ndarray]
    result: TrainResult
    num_examples: int
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    total_steps: int


def _planned_sigma(cfg: FedllmConfig, *, sample_rate: float, delta: float) -> float:
    if cfg.privacy.target_epsilon > 0:
        # Calibrated for the whole run, so the last round ends at the target, not past it.
        return calibrate_noise(
            target_epsilon=cfg.privacy.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=cfg.run.rounds * cfg.train.local_steps,
            mechanism=cfg.privacy.accountant,
        )
    return cfg.privacy.noise_multiplier


def _load_model(cfg: FedllmConfig):  # noqa: ANN202 - a peft model and its device
    device = pick_device(cfg.train.device)
    model = attach_lora(load_base_model(cfg.model, device), cfg.lora, seed=cfg.run.seed)
    return model, device


def run_train(
    cfg: FedllmConfig,
    data: SiteData,
    arrays: dict[str, np.ndarray],
    state: PrivacyState,
    *,
    pad_token_id: int,
    proximal_mu: float = 0.0,
) -> SiteRound:
    """Train one round from the global `arrays`; `state` gains this round's DP steps."""
    model, device = _load_model(cfg)
    set_adapter_arrays(model, arrays)
    n = len(data.train)
    dp = None
    if cfg.privacy.enabled:
        sample_rate = min(1.0, cfg.train.batch_size / n)
        if not state.delta:
            state.delta = cfg.privacy.delta or default_delta(n)
        if not state.noise_multiplier:
            state.noise_multiplier = _planned_sigma(cfg, sample_rate=sample_rate, delta=state.delta)
        if cfg.privacy.target_epsilon > 0:
            after = epsilon(
                [*state.history, (state.noise_multiplier, sample_rate, cfg.train.local_steps)],
                delta=state.delta,
                mechanism=cfg.privacy.accountant,
            )
            if after > cfg.privacy.target_epsilon * 1.0001:
                raise BudgetExceededError(
                    f"site {data.site}: another round would spend epsilon {after:.3f} > "
                    f"budget {cfg.privacy.target_epsilon}; refusing to train."
                )
        dp = DPSettings(
            noise_multiplier=state.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            sample_rate=sample_rate,
            expected_batch_size=max(1, round(sample_rate * n)),
            grad_sample_mode=cfg.privacy.grad_sample_mode,
        )

    def progress(step: int, steps: int, loss: float) -> None:
        log.info("site %d: step %d/%d, loss %.4f", data.site, step, steps, loss)

    result = train_local(
        model,
        data.train,
        cfg=cfg.train,
        pad_token_id=pad_token_id,
        device=device,
        dp=dp,
        proximal_mu=proximal_mu,
        progress=progress,
    )
    if dp is not None:
        state.history.append((dp.noise_multiplier, dp.sample_rate, result.steps))
    eps = (
        epsilon(state.history, delta=state.delta, mechanism=cfg.privacy.accountant)
        if dp is not None
        else float("inf")
    )
    return SiteRound(
        arrays=get_adapter_arrays(model),
        result=result,
        num_examples=n,
        epsilon=eps,
        delta=state.delta,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        sample_rate=dp.sample_rate if dp else 0.0,
        total_steps=total_steps(state.history),
    )


def run_evaluate(
    cfg: FedllmConfig, data: SiteData, arrays: dict[str, np.ndarray], *, pad_token_id: int
) -> EvalResult:
    """Held-out loss of the global adapter on this site's private split."""
    model, device = _load_model(cfg)
    set_adapter_arrays(model, arrays)
    return evaluate(
        model, data.eval, batch_size=cfg.eval.batch_size, pad_token_id=pad_token_id, device=device
    )


def tokenizer_for(cfg: FedllmConfig) -> object:
    return _cached_tokenizer(resolve_model_dir(cfg.model), cfg.model.trust_remote_code)


# A simulated site's process serves train and evaluate calls every round; loading the
# tokenizer (~0.7 s) and re-tokenizing the partition (~0.5 s) each time is pure waste.
# Both are deterministic functions of their keys, so a small per-process memo is safe.
@functools.lru_cache(maxsize=2)
def _cached_tokenizer(model_dir: str, trust_remote_code: bool) -> object:
    return load_tokenizer(
        model_dir, ModelConfig(name=model_dir, trust_remote_code=trust_remote_code)
    )


def site_data_for(cfg: FedllmConfig, *, site: int, num_sites: int) -> tuple[SiteData, object]:
    """This site's data and the tokenizer, memoised per (data, model, eval, seed) settings."""
    key = json.dumps(
        [cfg.to_dict()[k] for k in ("data", "model", "eval")] + [cfg.run.seed, site, num_sites],
        sort_keys=True,
    )
    if key not in _SITE_DATA:
        tokenizer = tokenizer_for(cfg)
        data = load_site_data(cfg, site=site, num_sites=num_sites, tokenizer=tokenizer)
        if len(_SITE_DATA) >= _MAX_CACHED_SITES:  # one simulation process serves many sites
            _SITE_DATA.pop(next(iter(_SITE_DATA)))
        _SITE_DATA[key] = (data, tokenizer)
    return _SITE_DATA[key]


_MAX_CACHED_SITES = 8
_SITE_DATA: dict[str, tuple[SiteData, object]] = {}
