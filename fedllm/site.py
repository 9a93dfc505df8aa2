"""What a site does with its private data, independent of Flower: prepare, train, evaluate.

The ClientApp (`clients/app.py`) only translates Flower records to and from these calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from fedllm.config import FedllmConfig
from fedllm.data import (
    load_examples,
    load_site_examples,
    site_files,
    site_share,
    source_partitioner,
    split_train_eval,
    tokenize_examples,
)
from fedllm.errors import BudgetExceededError, DataError, PolicyRefusedError
from fedllm.model import (  # load_site_model, tokenizer_for: re-exported, they lived here
    get_adapter_arrays,
    load_site_model,
    set_adapter_arrays,
    tokenizer_for,
)
from fedllm.privacy.accounting import (
    MECHANISMS,
    PLD_PRV_TOLERANCE,
    History,
    calibrate_noise,
    default_delta,
    epsilon_report,
    total_steps,
)
from fedllm.privacy.audit.canaries import audit_rows
from fedllm.privacy.audit.directions import GRADIENTS, CanaryDirections
from fedllm.privacy.budget import check_budget
from fedllm.privacy.dpsgd import DPSettings
from fedllm.privacy.ledger import DP_SGD, dp_sgd_entry
from fedllm.safety.screen import drop_flagged
from fedllm.site_policy import SitePolicy
from fedllm.train import EvalResult, TrainResult, evaluate, train_local

__all__ = [
    "LocalData",
    "PrivacyState",
    "SiteData",
    "SiteLimits",
    "SiteRound",
    "join_refusal",
    "load_site_data",
    "load_site_model",
    "plan_dp",
    "run_evaluate",
    "run_train",
    "site_data_for",
    "spend_record",
    "tokenizer_for",
]

log = logging.getLogger(__name__)

Features = list[dict[str, list[int]]]


@dataclass(frozen=True)
class LocalData:
    """A site's own data, named in its node config (`data`, and the field mapping beside it):
    the coordinator's run config then names no data of this site, and nothing is
    partitioned. A JSONL, JSON or CSV file, or a `datasets.save_to_disk` folder."""

    path: str
    prompt_field: str = "prompt"
    response_field: str = "response"
    category_field: str = ""


@dataclass
class SiteData:
    """One site's tokenized private examples; they never leave the site."""

    site: int
    train: Features
    eval: Features
    categories: list[str]
    virtual_records: int = 0  # an auditing site's inserted gradient canaries
    safety_dropped: int = 0  # training examples the safety filter flagged (safety.screen-site-data)
    fingerprint: str = ""  # of the site's records (`records_fingerprint`): its lifetime ledger

    @property
    def num_records(self) -> int:
        """Records the accountant sees: real examples plus inserted gradient canaries."""
        return len(self.train) + self.virtual_records


def records_fingerprint(examples: Any) -> str:
    """SHA-256 of a site's records, independent of their order and of how they are split,
    tokenized or templated: the same records always give the same lifetime ledger."""
    lines = sorted(
        json.dumps([p, r], ensure_ascii=False)
        for p, r in zip(examples["prompt"], examples["response"], strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _site_examples(cfg: FedllmConfig, *, site: int, num_sites: int, local: LocalData | None) -> Any:
    """This site's examples: its own data if it names some, else its partition of the
    run's `data.source`."""
    if local is not None:
        try:
            return load_site_examples(
                local.path,
                prompt_field=local.prompt_field,
                response_field=local.response_field,
                category_field=local.category_field or None,
            )
        except DataError as e:
            raise DataError(f"site {site}: node config 'data' = {local.path!r}: {e}") from e
    if not 0 <= site < num_sites:
        raise DataError(f"site index {site} is outside 0..{num_sites - 1}; fix 'partition-id'.")
    files = site_files(cfg.data.source)
    if files is not None:  # natural sites: one file each, nothing partitioned
        if len(files) != num_sites:
            raise DataError(
                f"data.source {cfg.data.source} holds {len(files)} site files but the "
                f"federation has {num_sites} sites; give each site one file."
            )
        return load_examples(
            str(files[site]),
            prompt_field=cfg.data.prompt_field,
            response_field=cfg.data.response_field,
            category_field=cfg.data.category_field or None,
        )
    partitioner = source_partitioner(  # loaded and split once per process (bounded memo)
        cfg.data.source,
        prompt_field=cfg.data.prompt_field,
        response_field=cfg.data.response_field,
        category_field=cfg.data.category_field or None,
        num_sites=num_sites,
        scheme=cfg.data.partitioner,
        seed=cfg.run.seed,
        alpha=cfg.data.dirichlet_alpha,
    )
    return site_share(partitioner, site=site, num_sites=num_sites, scheme=cfg.data.partitioner)


def load_site_data(
    cfg: FedllmConfig,
    *,
    site: int,
    num_sites: int,
    tokenizer: object,
    local: LocalData | None = None,
) -> SiteData:
    """This site's examples (`_site_examples`), split train/held-out at the site."""
    examples = _site_examples(cfg, site=site, num_sites=num_sites, local=local)
    train_ds, eval_ds = split_train_eval(
        examples,
        eval_fraction=cfg.data.eval_fraction,
        max_eval_examples=cfg.eval.max_examples,
        seed=cfg.run.seed,
        scheme=cfg.data.split,
    )
    dropped = 0
    if cfg.safety.screen_site_data:  # before the canaries, and before n is counted for DP
        train_ds, dropped = drop_flagged(train_ds, cfg.safety, site=site, device=cfg.train.device)
    if cfg.audit.inserts_data and site == cfg.audit.canary_site:
        train_ds = _with_audit_rows(train_ds, cfg, tokenizer)
    train = tokenize_examples(train_ds, tokenizer, max_length=cfg.data.max_length)
    held_out = tokenize_examples(eval_ds, tokenizer, max_length=cfg.data.max_length)
    if not train or not held_out:
        raise DataError(
            f"site {site} has no usable examples after tokenization "
            f"(train {len(train)}, held-out {len(held_out)}); raise 'data.max-length'."
        )
    virtual = 0
    if cfg.audit.gradient_canaries and site == cfg.audit.canary_site:
        virtual = int(_gradient_canaries(cfg, {}).included.sum())
    return SiteData(
        site=site,
        train=train,
        eval=held_out,
        categories=sorted(set(examples["category"])),
        virtual_records=virtual,
        safety_dropped=dropped,
        fingerprint=records_fingerprint(examples),
    )


def _gradient_canaries(cfg: FedllmConfig, shapes: dict[str, tuple[int, ...]]) -> Any:
    return CanaryDirections(
        cfg.audit.gradient_canaries, cfg.audit.canary_seed, shapes, tag=GRADIENTS
    )


def _canary_step(cfg: FedllmConfig, model: Any, sample_rate: float) -> Any:
    """The auditing site's per-step gradient canaries: each inserted one Poisson-sampled at
    the records' rate, contributing C·u_k (C = privacy.max-grad-norm)."""
    shapes = {n: tuple(a.shape) for n, a in get_adapter_arrays(model).items()}
    directions = _gradient_canaries(cfg, shapes)
    clip = cfg.privacy.max_grad_norm

    def step(rng: np.random.Generator) -> dict[str, np.ndarray]:
        sampled = directions.sample(sample_rate, rng)
        return directions.contribution(sampled, clip) if sampled else {}

    return step


def _with_audit_rows(train_ds: Any, cfg: FedllmConfig, tokenizer: object) -> Any:
    """The training split plus this auditing run's canaries and secrets (never held out)."""
    rows = audit_rows(cfg.audit, tokenizer)
    log.info(
        "site %d: auditing run, %d canary and secret rows added to %d training examples",
        cfg.audit.canary_site,
        len(rows["prompt"]),
        len(train_ds),
    )
    return datasets.Dataset.from_dict(
        {
            "prompt": list(train_ds["prompt"]) + rows["prompt"],
            "response": list(train_ds["response"]) + rows["response"],
        }
    )


@dataclass
class PrivacyState:
    """A site's DP-SGD history over the whole run, rebuilt from its own ledger.

    The ledger is the single source of truth: a resumed or restarted site reads back every
    spend it ever recorded, so its ε stays cumulative and nothing is counted twice.
    """

    history: History = field(default_factory=list)
    delta: float = 0.0
    noise_multiplier: float = 0.0

    @classmethod
    def from_ledger(cls, records: list[dict[str, Any]]) -> PrivacyState:
        spends = [r for r in records if r.get("mechanism") == DP_SGD]
        if not spends:
            return cls()
        return cls(
            history=[(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in spends],
            delta=spends[-1]["delta"],
            noise_multiplier=spends[-1]["noise_multiplier"],
        )


def spend_record(
    cfg: FedllmConfig, out: SiteRound, *, site: int, server_round: int
) -> dict[str, Any]:
    """The ledger entry for this site's DP-SGD spend in one round."""
    return dp_sgd_entry(
        run_id=cfg.run.name,
        server_round=server_round,
        site=site,
        noise_multiplier=out.noise_multiplier,
        sample_rate=out.sample_rate,
        steps=out.result.steps,
        max_grad_norm=cfg.privacy.max_grad_norm,
        delta=out.delta,
        epsilons={m: float(out.epsilons[m]) for m in MECHANISMS},
    )


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
    epsilons: dict[str, float | bool] = field(default_factory=dict)


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


@dataclass(frozen=True)
class SiteLimits:
    """What the site enforces whatever the run asks: its policy, its ε cap in this run (the
    run's own, lowered by the site's) and its cap over every run on these records."""

    policy: SitePolicy = field(default_factory=SitePolicy)
    budget: float | None = None
    lifetime_budget: float | None = None


def plan_dp(
    cfg: FedllmConfig,
    data: SiteData,
    state: PrivacyState,
    *,
    limits: SiteLimits,
    lifetime: History | None = None,
) -> tuple[DPSettings | None, dict[str, float | bool]]:
    """This round's DP-SGD settings and the ε report it would reach (None and {} without
    record-level DP), checked against the site's `limits` before anything trains; `state`
    gains the run's δ and σ if it had none.

    Raises
    ------
    BudgetExceededError
        If the round would take the site past its budget in this run, or past its lifetime
        budget composed with its `lifetime` history on these records.
    PolicyRefusedError
        If its σ or δ falls short of the site's policy.
    """
    if not cfg.privacy.record_level:
        return None, {}
    n = data.num_records
    sample_rate = min(1.0, cfg.train.batch_size / n)
    if not state.delta:
        state.delta = cfg.privacy.delta or default_delta(n)
    if not state.noise_multiplier:
        state.noise_multiplier = _planned_sigma(cfg, sample_rate=sample_rate, delta=state.delta)
    limits.policy.check_dp(state.noise_multiplier, state.delta, site=data.site)
    step = (state.noise_multiplier, sample_rate, cfg.train.local_steps)
    if lifetime is not None and limits.lifetime_budget is not None:
        check_budget(
            lifetime,
            step,
            delta=state.delta,
            budget=limits.lifetime_budget,
            who=f"site {data.site}, over every run on its records (lifetime)",
        )
    report = check_budget(
        state.history, step, delta=state.delta, budget=limits.budget, who=f"site {data.site}"
    )
    dp = DPSettings(
        noise_multiplier=state.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        sample_rate=sample_rate,
        expected_batch_size=max(1, round(sample_rate * n)),
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    return dp, report


def join_refusal(
    cfg: FedllmConfig,
    data: SiteData,
    state: PrivacyState,
    *,
    limits: SiteLimits,
    lifetime: History | None = None,
) -> str:
    """Why the site answers no request of a run it has not trained in yet (`state` has no
    spend), or "": it could not train even one round of it (its budget, lifetime budget or
    policy's σ and δ, the checks `plan_dp` makes). A site never joins a run it cannot train
    in, so the coordinator learns at the run's first request, and no evaluation of the
    site's held-out data is answered for it."""
    if state.history:
        return ""
    try:
        plan_dp(cfg, data, PrivacyState(), limits=limits, lifetime=lifetime)
    except (BudgetExceededError, PolicyRefusedError) as e:
        return str(e)
    return ""


def run_train(
    cfg: FedllmConfig,
    data: SiteData,
    arrays: dict[str, np.ndarray],
    state: PrivacyState,
    *,
    pad_token_id: int,
    proximal_mu: float = 0.0,
    limits: SiteLimits | None = None,
    lifetime: History | None = None,
    base_model: str | None = None,
) -> SiteRound:
    """Train one round from the global `arrays`; `state` gains this round's DP steps. The
    base model is the site's own copy `base_model` if given (node config `model`), else
    the one `model.name` names.

    Raises
    ------
    BudgetExceededError, PolicyRefusedError
        Before any training, if the round falls outside the site's `limits` (`plan_dp`).
    """
    n = data.num_records
    dp, report = plan_dp(cfg, data, state, limits=limits or SiteLimits(), lifetime=lifetime)
    model, device = load_site_model(cfg, base_model=base_model)
    set_adapter_arrays(model, arrays)
    canaries = None
    if data.virtual_records:
        rate = dp.sample_rate if dp is not None else min(1.0, cfg.train.batch_size / n)
        canaries = _canary_step(cfg, model, rate)

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
        canaries=canaries,
    )
    if dp is not None:
        state.history.append((dp.noise_multiplier, dp.sample_rate, result.steps))
        if result.steps != cfg.train.local_steps:  # the checked report assumed local_steps
            report = epsilon_report(state.history, delta=state.delta)
        if report["disagree"]:
            log.warning(
                "site %d: PRV (%.4f) and PLD (%.4f) disagree by more than %.2f epsilon",
                data.site,
                report["prv"],
                report["pld"],
                PLD_PRV_TOLERANCE,
            )
    eps = float(report["epsilon"]) if dp is not None else float("inf")
    return SiteRound(
        arrays=get_adapter_arrays(model),
        result=result,
        num_examples=n,
        epsilon=eps,
        delta=state.delta,
        noise_multiplier=dp.noise_multiplier if dp else 0.0,
        sample_rate=dp.sample_rate if dp else 0.0,
        total_steps=total_steps(state.history),
        epsilons=report,
    )


def run_evaluate(
    cfg: FedllmConfig,
    data: SiteData,
    arrays: dict[str, np.ndarray],
    *,
    pad_token_id: int,
    base_model: str | None = None,
) -> EvalResult:
    """Held-out loss of the global adapter on this site's private split, on the site's own
    copy of the base model `base_model` if given."""
    model, device = load_site_model(cfg, base_model=base_model)
    set_adapter_arrays(model, arrays)
    return evaluate(
        model, data.eval, batch_size=cfg.eval.batch_size, pad_token_id=pad_token_id, device=device
    )


# A simulated site's process serves train and evaluate calls every round; re-tokenizing the
# partition (~0.5 s) each time is pure waste. It is a deterministic function of the key, so a
# small per-process memo is safe.
def site_data_for(
    cfg: FedllmConfig,
    *,
    site: int,
    num_sites: int,
    local: LocalData | None = None,
    base_model: str | None = None,
) -> tuple[SiteData, object]:
    """This site's data and the tokenizer (of its own copy of the base model `base_model`, if
    given), memoised per every setting `load_site_data` reads: the data, model (tokenizer),
    eval, safety and audit sections, train.device (the safety filter's device), run.seed,
    the site's own data and its own model's path."""
    key = json.dumps(
        [cfg.to_dict()[k] for k in _SITE_DATA_SECTIONS]
        + [cfg.train.device, cfg.run.seed, site, num_sites, repr(local), base_model],
        sort_keys=True,
    )
    if key not in _SITE_DATA:
        tokenizer = tokenizer_for(cfg, base_model)
        data = load_site_data(cfg, site=site, num_sites=num_sites, tokenizer=tokenizer, local=local)
        if len(_SITE_DATA) >= _MAX_CACHED_SITES:  # one simulation process serves many sites
            _SITE_DATA.pop(next(iter(_SITE_DATA)))
        _SITE_DATA[key] = (data, tokenizer)
    return _SITE_DATA[key]


_MAX_CACHED_SITES = 8
# The config sections `load_site_data` (and the tokenizer) read; a new setting it reads joins
# the key in `site_data_for`, or a changed value would be served stale data.
_SITE_DATA_SECTIONS = ("data", "model", "eval", "safety", "audit")
_SITE_DATA: dict[str, tuple[SiteData, object]] = {}
