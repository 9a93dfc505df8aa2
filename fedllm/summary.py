"""Turn a run's recorded rounds into `summary.json` and the table users read (pure)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from rich.table import Table

from fedllm.config import FedllmConfig, config_hash
from fedllm.privacy.budget import effective_budget
from fedllm.privacy.userdp import WITHHELD
from fedllm.safety.config import GATE_RULE

__all__ = [
    "SUMMARY_KEYS",
    "build_summary",
    "package_versions",
    "participation_withheld",
    "render_table",
    "safety_section",
    "user_level_section",
    "weighted_mean",
]

_PACKAGES = ("fedllm", "flwr", "torch", "transformers", "peft", "opacus", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def weighted_mean(values: list[tuple[float, float]]) -> float | None:
    """Mean of (value, weight) pairs; None when there is nothing to average."""
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


def _per_round(state: dict[str, Any], kind: str) -> dict[int, dict[str, dict[str, float]]]:
    return {int(r): sites for r, sites in state.get(kind, {}).items()}


# Every key of summary.json, in the order it is written. The core keys come from the run's
# book (what each site did); the mechanism sections from the stage that owns each
# (`fedllm.strategy`), and default to what a run without that mechanism writes.
SUMMARY_KEYS = (
    "run_name",
    "run_dir",
    "status",
    "stop_reason",
    "rounds_planned",
    "rounds_completed",
    "eval_rounds",
    "eval_loss",
    "sites",
    "epsilon",
    "delta",
    "epsilon_by_accountant",
    "privacy",
    "user_level",
    "secure_aggregation",
    "audit",
    "bytes_per_round",
    "round_seconds",
    "rejected_updates",
    "refused",
    "budget",
    "failures",
    "participation",
    "validation",
    "norm_bound",
    "robust_aggregation",
    "streaming",
    "evaluation",
    "update_encoding",
    "security",
    "safety",
    "adapter",
    "config_hash",
    "versions",
)
SECTION_DEFAULTS: dict[str, Any] = {
    "user_level": None,
    "secure_aggregation": None,
    "audit": {},
    "security": None,
    "safety": None,
    "validation": None,
    "norm_bound": None,
    "robust_aggregation": None,
    "streaming": False,
    "evaluation": None,
    "update_encoding": None,
}


def build_summary(
    cfg: FedllmConfig,
    state: dict[str, Any],
    *,
    run_dir: str,
    sections: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The machine-readable record of a run, rebuilt after every round from its state (the
    loop's and the book's keys) and the stages' `sections`; a section no stage wrote gets
    the value a run without that mechanism has, and a section of a stage fedllm does not
    ship is written after the others."""
    evals = _per_round(state, "evals")
    trains = _per_round(state, "trains")
    rounds = sorted(evals)
    sites = sorted({s for r in evals.values() for s in r} | {s for r in trains.values() for s in r})
    eval_loss = [
        weighted_mean([(m["eval-loss"], m["eval-tokens"]) for m in evals[r].values()])
        for r in rounds
    ]
    per_site: dict[str, dict[str, Any]] = {}
    for s in sites:
        train_rounds = sorted(r for r in trains if s in trains[r])
        per_site[s] = {
            "eval_loss": [evals[r][s]["eval-loss"] if s in evals[r] else None for r in rounds],
            "perplexity": [evals[r][s]["perplexity"] if s in evals[r] else None for r in rounds],
            "train_loss": {str(r): trains[r][s]["train-loss"] for r in train_rounds},
            "epsilon": {str(r): trains[r][s]["epsilon"] for r in train_rounds},
            "num_examples": trains[train_rounds[-1]][s]["num-examples"] if train_rounds else None,
        }
    final_eps = {s: _last(per_site[s]["epsilon"]) for s in sites}
    deltas = {
        s: trains[max(r for r in trains if s in trains[r])][s]["delta"]
        for s in sites
        if any(s in trains[r] for r in trains)
    }
    out = {
        **SECTION_DEFAULTS,
        "run_name": cfg.run.name,
        "run_dir": run_dir,
        "status": state.get("status", "running"),
        "stop_reason": state.get("stop_reason"),
        "rounds_planned": cfg.run.rounds,
        "rounds_completed": int(state.get("rounds_completed", 0)),
        "eval_rounds": rounds,
        "eval_loss": eval_loss,
        "sites": per_site,
        "epsilon": final_eps,
        "delta": deltas,
        "epsilon_by_accountant": _by_accountant(trains),
        "privacy": {
            "mode": cfg.privacy.mode,
            "guarantee": _guarantee_text(cfg),
            "accountant": "min(PRV, PLD); RDP kept as an upper bound",
            "calibration_accountant": cfg.privacy.accountant,
            "ledger": "ledger.jsonl (hash-chained; check with `fedllm audit verify`)",
            "noise_multiplier": _site_sigma(trains),
            "max_grad_norm": cfg.privacy.max_grad_norm if cfg.privacy.record_level else None,
            "sampling": "poisson" if cfg.privacy.record_level else "shuffled batches",
            "secure_rng": False,
        },
        "bytes_per_round": state.get("bytes", []),
        "round_seconds": state.get("round_seconds", []),
        "rejected_updates": state.get("rejected", []),
        "refused": state.get("refused", []),
        "budget": _budget_status(cfg, final_eps, state.get("refused", [])),
        "failures": state.get("failures", []),
        "participation": _participation(state, trains),
        "adapter": state.get("adapter", {}),
        "config_hash": config_hash(cfg),
        "versions": package_versions(),
        **(sections or {}),
    }
    # A registered stage's own section (one not among the keys above) comes last.
    return {**{k: out[k] for k in SUMMARY_KEYS}, **out}


def _participation(
    state: dict[str, Any], trains: dict[int, dict[str, dict[str, float]]]
) -> list[dict[str, Any]]:
    """Per training round: whose updates were aggregated, whose were rejected, and which
    sites never answered (a dropped SuperNode is named here)."""
    out = []
    kinds = ("rejected", "refused", "failures")
    attempted = {
        e["round"]
        for kind in kinds
        for e in state.get(kind, [])
        if e.get("phase", "train") == "train"
    }
    for r in sorted(set(trains) | attempted):

        def sites(kind: str, r: int = r) -> list[Any]:
            return sorted(
                {
                    e["site"] if e.get("site") is not None else e.get("sender")
                    for e in state.get(kind, [])
                    if e["round"] == r and e.get("phase", "train") == "train"
                },
                key=str,
            )

        out.append(
            {
                "round": r,
                "aggregated": sorted(int(s) for s in trains.get(r, {})),
                "rejected": sites("rejected"),
                "refused": sites("refused"),
                "missing": sites("failures"),
            }
        )
    return out


def safety_section(
    cfg: FedllmConfig, recorded: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any] | None:
    """Content safety: the base model's rates, each screened round's rates, intervals and gate
    decision, the rollbacks (`recorded`: the safety gate's state), and what each site dropped
    from its training data (a count, from the training figures in `state`)."""
    s = cfg.safety
    if not (s.screens or s.screen_site_data):
        return None
    trains = _per_round(state, "trains")
    out: dict[str, Any] = {
        "filter": recorded.get("filter", s.filter),
        "threshold": recorded.get("threshold"),
        "probes": recorded.get("probes", s.probes if s.screens else None),
        "probe_counts": recorded.get("probe_counts"),
        "screen_every": s.screen_every,
        "max_new_tokens": s.max_new_tokens,
        "harmful_compliance": (
            "share of harmful probes whose answer is no refusal and is flagged by the filter"
        ),
        "benign_over_refusal": "share of benign probes whose answer is a refusal",
        "gate": {
            "max_rise_points": s.gate_max_rise,
            "action": s.gate_action,
            "rule": GATE_RULE,
            "detectable_rise_points": recorded.get("detectable_rise_points"),
        }
        if s.screens
        else None,
        "base": recorded.get("base"),
        "rounds": recorded.get("rounds", []),
        "rollbacks": recorded.get("rollbacks", []),
        "site_data": None,
    }
    if s.screen_site_data:
        dropped = {
            site: int(m["safety-dropped"])
            for r in sorted(trains)
            for site, m in trains[r].items()
            if "safety-dropped" in m
        }
        out["site_data"] = {
            "filter": s.filter,
            "threshold": s.site_data_threshold or None,  # None: the filter's own threshold
            "dropped": dict(sorted(dropped.items(), key=lambda kv: int(kv[0]))),
            "note": "only the count leaves a site; like its example count, it is not DP-protected",
        }
    return out


def _guarantee_text(cfg: FedllmConfig) -> str:
    parts = []
    if cfg.privacy.record_level:
        parts.append("record-level (example) DP per site, (epsilon, delta) over the whole run")
    if cfg.privacy.user_level:
        parts.append(
            "user-level (whole-site) DP for the run, in `user_level`, never combined with it"
        )
    return "; ".join(parts) or "none"


def participation_withheld(cfg: FedllmConfig) -> bool:
    """Whether the run keeps which sites trained in which round out of its files: user-level
    DP at the coordinator (Poisson-sampled sites) without record-level DP. Under record+user
    each site's record-level spends name its rounds in the run's ledger, as they must for
    `fedllm audit verify` to check them, so withholding the same facts elsewhere would hide
    nothing; under HE every site is asked every round (q = 1)."""
    p = cfg.privacy
    return p.user_level and not p.record_level and cfg.strategy.secure_aggregation != "he"


def user_level_section(cfg: FedllmConfig, user_dp: dict[str, Any]) -> dict[str, Any] | None:
    """User-level DP-FedAvg: its own ε, δ and parameters (never mixed with record-level ε),
    from the user-level stage's state `user_dp`: only what the mechanism released or what is
    public (rounds recorded before the rest was withheld lose it here)."""
    if not cfg.privacy.user_level:
        return None
    p = cfg.privacy
    he = cfg.strategy.secure_aggregation == "he"
    rounds = user_dp.get("rounds", [])
    if not he:
        rounds = [{k: v for k, v in r.items() if k not in WITHHELD} for r in rounds]
    last = rounds[-1] if rounds else {}
    cap = p.user_epsilon_max or None
    spent = last.get("epsilon")
    withheld = participation_withheld(cfg)
    return {
        "mechanism": (
            "DP-FedAvg with distributed Gaussian noise (each of n sites adds N(0, z^2 S^2 / n) "
            "before encrypting), add/remove one site's whole dataset"
            if he
            else "DP-FedAvg (Gaussian), add/remove one site's whole dataset"
        ),
        "epsilon": spent,
        "delta": p.user_delta,
        "epsilon_by_accountant": last.get("epsilon_by_accountant", {}),
        "noise_multiplier": p.user_noise_multiplier,
        "clipping": p.user_clipping,
        "clip_norm": [r["clip_norm"] for r in rounds],
        "sample_rate": cfg.strategy.fraction_train,
        "sampling": "every site every round" if he else "poisson (sites)",
        "noise_multiplier_accounted": [r.get("noise_multiplier") for r in rounds] if he else None,
        "noise_assumption": cfg.he.noise_assumption if he else None,
        "epsilon_max": cap,
        "within_budget": cap is None or spent is None or spent <= cap,
        "rounds": rounds,
        "participation_withheld": withheld,
        "not_recorded": None
        if he
        else (
            "the sites' update norms, the exact count of clipped updates (adaptive clipping "
            "records its noised count), and which and how many sites were sampled or "
            "contributed: the mechanism does not protect them"
            + (
                "; nor, anywhere in the run's files, which sites trained in which round "
                "(participation, per-round training figures, training-phase rejections, "
                "failures and refusals, bytes per round)"
                if withheld
                else "; the record-level ledger and per-site figures still name each site's "
                "rounds (record+user)"
            )
        ),
    }


def _budget_status(
    cfg: FedllmConfig, spent: dict[str, float | None], refused: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per site: the run's cap, what was spent, and whether the site ran out."""
    cap = effective_budget(
        epsilon_max=cfg.privacy.epsilon_max, target_epsilon=cfg.privacy.target_epsilon
    )
    exhausted = {str(r["site"]) for r in refused}
    return {
        "epsilon_max": cap,
        "sites": {
            s: {
                "spent": e,
                "within_budget": cap is None or (e is not None and e <= cap),
                "exhausted": s in exhausted,
            }
            for s, e in spent.items()
        },
    }


def _last(by_round: dict[str, float]) -> float | None:
    return by_round[max(by_round, key=int)] if by_round else None


def _by_accountant(trains: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each site's latest cumulative ε by each accountant."""
    out: dict[str, dict[str, float]] = {}
    for r in sorted(trains):
        for s, m in trains[r].items():
            values = {k[len("epsilon-") :]: v for k, v in m.items() if k.startswith("epsilon-")}
            if values:
                out[s] = values
    return out


def _site_sigma(trains: dict[int, dict[str, dict[str, float]]]) -> dict[str, float]:
    return {s: m["noise-multiplier"] for r in sorted(trains) for s, m in trains[r].items()}


def render_table(summary: dict[str, Any]) -> Any:
    """A rich table: per site, held-out loss at round 0 and at the end, and ε spent."""

    rounds = summary["eval_rounds"]
    table = Table(
        title=f"fedllm run {summary['run_name']}: {summary['rounds_completed']}/"
        f"{summary['rounds_planned']} rounds, {summary['status']}"
    )
    columns = ("site", "examples", "rounds in", "eval loss (start)", "eval loss (end)")
    for col in (*columns, "ppl (end)", "epsilon"):
        table.add_column(col, justify="right")
    participation = summary.get("participation") or []
    withheld = (summary.get("user_level") or {}).get("participation_withheld", False)
    for s, info in summary["sites"].items():
        losses = [x for x in info["eval_loss"] if x is not None]
        ppl = [x for x in info["perplexity"] if x is not None]
        eps = summary["epsilon"].get(s)
        table.add_row(
            s,
            str(info["num_examples"] or "-"),
            "-"
            if withheld
            else f"{sum(int(s) in p.get('aggregated', []) for p in participation)}/"
            f"{len(participation)}",
            f"{losses[0]:.4f}" if losses else "-",
            f"{losses[-1]:.4f}" if losses else "-",
            f"{ppl[-1]:.2f}" if ppl else "-",
            "-" if eps is None else f"{eps:.4f} (δ={summary['delta'].get(s, 0):.1e})",
        )
    if rounds and summary["eval_loss"]:
        first, last = summary["eval_loss"][0], summary["eval_loss"][-1]
        if first is not None and last is not None:
            table.caption = (
                f"global eval loss {first:.4f} (round 0) -> {last:.4f} (round {rounds[-1]})"
            )
    notes = [
        f"round {p['round']}: {kind} site {', '.join(map(str, p[kind]))}"
        for p in participation
        for kind in ("rejected", "missing")
        if p.get(kind)
    ]
    if (summary.get("security") or {}).get("sign_updates"):
        notes.append("every aggregated update was signed and verified against the registry")
    if notes:
        table.caption = "\n".join(filter(None, [table.caption, *notes]))
    safety = summary.get("safety") or {}
    if safety.get("base"):
        screened = [safety["base"], *safety.get("rounds", [])]
        rates = ", ".join(
            f"r{e['round']} {100 * e['harmful_compliance']['rate']:.0f}%/"
            f"{100 * e['benign_over_refusal']['rate']:.0f}%"
            for e in screened
        )
        rolled = [str(r["round"]) for r in safety.get("rollbacks", [])]
        table.caption = (table.caption or "") + (
            f"\nsafety ({safety['filter']}): harmful compliance / benign over-refusal {rates}"
            + (f"; rolled back round {', '.join(rolled)}" if rolled else "")
        )
    if (safety.get("site_data") or {}).get("dropped"):
        dropped = ", ".join(f"site {k}: {v}" for k, v in safety["site_data"]["dropped"].items())
        note = f"training examples dropped by the safety filter: {dropped}"
        table.caption = "\n".join(filter(None, [table.caption, note]))
    user = summary.get("user_level") or {}
    if user.get("epsilon") is not None:
        table.caption = (table.caption or "") + (
            f"\nuser-level (whole-site) epsilon {user['epsilon']:.4f} at delta {user['delta']:g}"
            " -- a separate guarantee from the per-site record-level epsilon above"
            + ("; which sites trained in which round is not recorded" if withheld else "")
        )
    return table
