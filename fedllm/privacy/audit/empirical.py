"""`fedllm audit canaries`: score an auditing run's canaries and secrets against its model.

Run after the run, by the auditor, from the run directory alone: the canaries and secrets are
regenerated from `audit.canary-seed`, the base model is loaded with the initial adapter and
then with the final one, and each canary's score is how much the final adapter lowered its
loss. The ε lower bound is set beside the proven ε of the auditing site; a lower bound above
the proven ε means the accounting or the implementation is wrong, and is reported as such.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedllm.config import FedllmConfig
from fedllm.data import tokenize_examples
from fedllm.errors import FedllmError, RunDirError
from fedllm.model import (
    ADAPTER_FILE,
    adapter_spec,
    get_adapter_arrays,
    init_adapter,
    load_adapter_arrays,
    load_site_model,
    set_adapter_arrays,
    tokenizer_for,
)
from fedllm.privacy.accounting import default_delta, epsilon_report
from fedllm.privacy.audit.canaries import (
    Secret,
    exposure,
    make_canaries,
    make_secrets,
    secret_alternatives,
)
from fedllm.privacy.audit.directions import GRADIENTS, CanaryDirections
from fedllm.privacy.audit.lower_bound import one_run_audit
from fedllm.privacy.ledger import DP_SGD, USER_GAUSSIAN, Ledger
from fedllm.rundir import EMPIRICAL_AUDIT, RunDir, write_json_atomic
from fedllm.secure.at_rest import AtRestKey, stored_file
from fedllm.train import example_losses

__all__ = ["AUDIT_FILE", "AuditBugError", "audit_run", "proven_epsilon"]

AUDIT_FILE = EMPIRICAL_AUDIT  # relative to the run directory


class AuditBugError(FedllmError):
    """An empirical lower bound exceeded the proven ε: the guarantee as stated is false."""


def proven_epsilon(records: list[dict[str, Any]], site: int) -> tuple[float, float | None, str]:
    """The tightest proven ε that covers one record of `site`, its δ, and where it comes from.

    Recomputed from the ledger's raw parameters, not read from its claims. A site's
    record-level DP-SGD guarantee covers each of its records; so does the user-level
    guarantee (one record changes at most one site's data). With neither, nothing is proven.
    """
    options: list[tuple[float, float, str]] = []
    histories = (
        (
            [r for r in records if r.get("mechanism") == DP_SGD and str(r["site"]) == str(site)],
            "record-level DP-SGD",
        ),
        ([r for r in records if r.get("mechanism") == USER_GAUSSIAN], "user-level DP-FedAvg"),
    )
    for recs, source in histories:
        if recs:
            history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in recs]
            delta = float(recs[-1]["delta"])
            options.append((float(epsilon_report(history, delta=delta)["epsilon"]), delta, source))
    if not options:
        return math.inf, None, "none (no DP)"
    return min(options)


def _features(cfg: FedllmConfig, tokenizer: Any, prompts: list[str], responses: list[str]):  # noqa: ANN202
    ds = datasets.Dataset.from_dict({"prompt": prompts, "response": responses})
    feats = tokenize_examples(ds, tokenizer, max_length=cfg.data.max_length)
    if len(feats) != len(prompts):
        raise FedllmError(
            f"{len(prompts) - len(feats)} canaries did not fit data.max-length = "
            f"{cfg.data.max_length}; the audit needs every one of them."
        )
    return feats


def _secret_report(
    secret: Secret,
    cfg: FedllmConfig,
    tokenizer: Any,
    score: Any,
) -> dict[str, Any]:
    alternatives = secret_alternatives(
        secret, cfg.audit.secret_alternatives, seed=cfg.audit.canary_seed
    )
    texts = [secret.response()] + [secret.response(d) for d in alternatives]
    feats = _features(cfg, tokenizer, [secret.prompt] * len(texts), texts)
    out = {}
    for label, model_state in (("base", "initial"), ("trained", "final")):
        losses = score(feats, model_state)
        out[label] = exposure(float(losses[0]), losses[1:])
    return {"name": secret.name, "repeats": cfg.audit.secret_repeats, **out}


def _final_adapter(
    path: Path, summary: dict[str, Any], at_rest: AtRestKey | None
) -> dict[str, np.ndarray]:
    ckpt = summary.get("adapter", {}).get("final_checkpoint")
    if not ckpt or stored_file(Path(ckpt) / ADAPTER_FILE) is None:
        raise RunDirError(f"run {path} has no final adapter checkpoint to audit.")
    return load_adapter_arrays(Path(ckpt), at_rest=at_rest)


def _gradient_canary_audit(
    cfg: FedllmConfig, saved: dict[str, np.ndarray], delta: float
) -> dict[str, Any]:
    """White-box scores ⟨final − initial, u_k⟩ from the checkpoint alone (no model needed)."""
    spec = adapter_spec(cfg.model, cfg.lora)
    initial = init_adapter(spec, seed=cfg.run.seed)
    shapes = {n: spec.shapes[n] for n in spec.sent}  # the trainable tensors, in model order
    change = {n: saved[n].astype(np.float64) - initial[n] for n in shapes}
    directions = CanaryDirections(
        cfg.audit.gradient_canaries, cfg.audit.canary_seed, shapes, tag=GRADIENTS
    )
    # Gradient descent moves against a gradient: a trained-on canary pulls the adapter
    # towards -u_k, so the membership score is the negated projection.
    scores = -directions.scores(change)
    inc = directions.included
    guess = one_run_audit(scores, inc, delta=delta)
    return {
        **guess.to_dict(),
        "method": "white-box gradient canaries, score = -<final - initial adapter, u_k>",
        "mean_score_included": float(scores[inc].mean()),
        "mean_score_excluded": float(scores[~inc].mean()),
    }


def audit_run(
    path: Path,
    cfg: FedllmConfig,
    summary: dict[str, Any],
    *,
    device: str = "auto",
    at_rest: AtRestKey | None = None,
) -> dict[str, Any]:
    """Score canaries and secrets, compare with the proven ε, write `audit/empirical.json`
    (the checkpoint and ledger opened under `at_rest` if sealed; the result holds no weights).

    Raises
    ------
    RunDirError
        If the run inserted no canaries or has no final adapter.
    AuditBugError
        After writing the result, if a lower bound exceeds the proven ε.
    """
    audit = cfg.audit
    if not audit.at_site:
        raise RunDirError(
            f"run {path} inserted no canaries or secrets; rerun with audit.canaries or "
            "audit.gradient-canaries >= 1000 and/or audit.secrets > 0."
        )
    saved = _final_adapter(path, summary, at_rest)
    site = audit.canary_site
    records = Ledger(RunDir.at(path).ledger_path, key=at_rest).records()
    proven, proven_delta, source = proven_epsilon(records, site)
    n_site = (summary.get("sites", {}).get(str(site)) or {}).get("num_examples") or 1
    delta = proven_delta if proven_delta is not None else default_delta(int(n_site))
    result: dict[str, Any] = {
        "run": summary.get("run_name"),
        "site": site,
        "proven_epsilon": proven if math.isfinite(proven) else None,
        "proven_from": source,
        "delta": delta,
        "confidence": 0.95,
    }
    if audit.gradient_canaries:
        result["gradient_canaries"] = _gradient_canary_audit(cfg, saved, delta)
    if audit.inserts_data:
        result.update(_input_canary_audit(cfg, saved, delta, device=device))
    bounds = {
        kind: result[kind]["epsilon_lower_bound"]
        for kind in ("gradient_canaries", "membership")
        if kind in result
    }
    result["epsilon_lower_bound"] = max(bounds.values(), default=0.0)
    bug = {k: b for k, b in bounds.items() if b > proven}
    result["status"] = "BUG" if bug else "consistent"
    out = RunDir.at(path).empirical_audit_path
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    if bug:
        kind, bound = max(bug.items(), key=lambda kv: kv[1])
        raise AuditBugError(
            f"the empirical lower bound {bound:.4f} ({kind}) exceeds the proven epsilon "
            f"{proven:.4f} ({source}) of site {site}: the stated guarantee is false; do not "
            "rely on it."
        )
    return result


def _input_canary_audit(
    cfg: FedllmConfig, saved: dict[str, np.ndarray], delta: float, *, device: str
) -> dict[str, Any]:
    """Black-box scores: the base model with the initial, then the final adapter."""
    audit = cfg.audit
    tokenizer = tokenizer_for(cfg)
    model, dev = load_site_model(cfg, device)
    initial = get_adapter_arrays(model)
    final = {n: saved[n] for n in initial}
    pad = int(tokenizer.pad_token_id)
    loaded = {"state": ""}

    def score(feats: list[dict[str, list[int]]], state: str) -> np.ndarray:
        if loaded["state"] != state:
            set_adapter_arrays(model, initial if state == "initial" else final)
            loaded["state"] = state
        return example_losses(model, feats, batch_size=32, pad_token_id=pad, device=dev)

    out: dict[str, Any] = {}
    if audit.canaries:
        canaries = make_canaries(
            tokenizer, count=audit.canaries, length=audit.canary_length, seed=audit.canary_seed
        )
        feats = _features(cfg, tokenizer, canaries.prompts, canaries.responses)
        scores = score(feats, "initial") - score(feats, "final")
        guess = one_run_audit(scores, canaries.included, delta=delta)
        inc = canaries.included
        out["membership"] = {
            **guess.to_dict(),
            "method": "black-box random-word canaries, score = base loss - final loss",
            "mean_score_included": float(scores[inc].mean()),
            "mean_score_excluded": float(scores[~inc].mean()),
        }
    if audit.secrets:
        secrets = make_secrets(audit.secrets, seed=audit.canary_seed)
        out["secrets"] = [_secret_report(s, cfg, tokenizer, score) for s in secrets]
    return out
