"""Robust aggregation against hostile sites: `python -m benchmarks.robustness`.

One hostile site of five (of seven for Bulyan, which needs n >= 4f + 3 = 7 for f = 1)
attacks through `benchmarks/attacks.py`: sign-flip, scale, noise and a backdoor. Every run
is fedllm's real ServerApp and ClientApp, mods included (`tests/inprocess.py`: in this
process, without a SuperLink or Ray). Defences: none (FedAvg), norm bounding (the bound is
the median honest update norm of the no-attacker run), FedMedian, FedTrimmedAvg, Krum,
MultiKrum, Bulyan, and record-level DP-SGD (`privacy.*`).

- **Grid** (every attack x every defence, and the no-attacker runs): the tiny Llama of
  `tests/tiny.py`, first pretrained here (all weights, on the records no site holds out),
  so that an attack has something to destroy.
- **Embedded** (fedllm's default model, SmolLM2-135M-Instruct, default data and
  partition): the no-attacker run, and for each attack no defence against the grid's best
  5-site defence for that attack.

For each run: held-out loss per round (`summary.json` `eval_loss`), and for the backdoor and
the no-attacker runs the share of held-out prompts with the trigger (and, as a control,
without it) whose greedy answer with the final adapter is the attacker's fixed answer.
Writes `benchmarks/results/robustness.json` and `robustness.png` beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attacks import ATTACKS, Attack  # noqa: E402
from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import BenchmarkRun, fresh_work  # noqa: E402

DEFENCES = (
    "none",
    "norm-bound",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "dp-sgd",
)
BULYAN_SITES = 7  # 4f + 3 with f = 1
SITES = 5
DP = {"privacy.mode": "record", "privacy.noise-multiplier": 0.8, "privacy.max-grad-norm": 1.0}

# How hard each attack pushes: strong enough that it works on FedAvg (the noise at the
# honest update's own norm did not: see `calibration` in the result).
FACTORS = {"sign-flip": 10.0, "scale": 100.0, "noise": 30.0, "backdoor": 5.0}

TINY = {
    "run.rounds": 3,
    "run.min-sites": SITES,
    "privacy.mode": "none",
    "lora.rank": 16,
    "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "lora.ffa": True,
    "train.local-steps": 8,
    "train.batch-size": 16,
    "train.physical-batch-size": 16,
    "train.learning-rate": 0.01,
    "eval.max-examples": 16,
}
TINY_BACKDOOR_TRAINING = {"train.local-steps": 30, "train.learning-rate": 0.03}

EMBEDDED = {
    "run.rounds": 1,
    "run.min-sites": SITES,
    "privacy.mode": "none",
    "train.local-steps": 2,
    "train.batch-size": 8,
    "train.physical-batch-size": 8,
    "eval.max-examples": 8,
}
EMBEDDED_BACKDOOR_TRAINING = {"train.local-steps": 8, "train.learning-rate": 0.01}


def pretrain_tiny(path: Path, *, hidden: int, steps: int) -> Path:
    """The tiny Llama of `tests/tiny.py`, trained (all weights, AdamW 3e-3, batches of 32)
    for `steps` on every chatterbot record whose hash never holds it out (so no site's
    held-out record is seen). A random model's loss sits near log(vocab), where no attack
    can raise it much; this one starts from a model that has learned the chat format."""
    # heavy (torch, transformers): only the benchmark's setup needs them
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.config import parse_config
    from fedllm.data import collate_batch, load_examples, split_train_eval, tokenize_examples
    from tests.tiny import make_tiny_model_dir

    cfg = parse_config({})
    random_dir = make_tiny_model_dir(path.with_name(path.name + "-random"), hidden_size=hidden)
    tokenizer = AutoTokenizer.from_pretrained(random_dir)
    model = AutoModelForCausalLM.from_pretrained(random_dir)
    records = load_examples(cfg.data.source, category_field=cfg.data.category_field)
    never_held_out, _ = split_train_eval(
        records, eval_fraction=cfg.data.eval_fraction, max_eval_examples=len(records), seed=0
    )
    features = tokenize_examples(never_held_out, tokenizer, max_length=cfg.data.max_length)
    rng = np.random.default_rng(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            batch = [features[i] for i in rng.choice(len(features), 32)]
            model(**collate_batch(batch, pad_token_id=tokenizer.pad_token_id)).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def defence_overrides(defence: str, *, norm_bound: float) -> dict[str, Any]:
    """The run-config keys of one defence (none: FedAvg as configured)."""
    if defence == "none":
        return {}
    if defence == "norm-bound":
        return {"strategy.norm-bound": norm_bound}
    if defence == "dp-sgd":
        return dict(DP)
    return {"strategy.name": defence}


class Grid:
    """The runs of one model: each in its own run directory under `work`."""

    def __init__(self, run: BenchmarkRun, work: Path, common: dict[str, Any], label: str):
        self.run, self.work, self.common, self.label = run, work, common, label
        self.results: dict[str, dict[str, Any]] = {}

    def one(
        self,
        name: str,
        overrides: dict[str, Any],
        *,
        sites: int,
        attack: Attack | None,
        backdoor: Attack,
    ) -> dict[str, Any]:
        """One run, its held-out losses and (for the backdoor and no-attacker runs) the
        backdoor's success with the final adapter."""
        # heavy (the apps, Flower, torch): imported once the benchmark runs
        from benchmarks.attacks import AttackMod, hostile_app, write_backdoor_data
        from fedllm.config import parse_config
        from tests.inprocess import run_in_process

        run_dir = self.work / "runs" / name
        if run_dir.exists():
            raise SystemExit(f"{run_dir} already exists; give a fresh --work directory.")
        flat = {
            **self.common,
            **overrides,
            "run.name": name,
            "run.output-dir": str(self.work / "runs"),
            "run.min-sites": sites,
        }
        cfg = parse_config(flat)
        hostile = sites - 1  # the last partition attacks
        mod = AttackMod({hostile: attack} if attack else {})
        data = {}
        if attack is not None and attack.kind == "backdoor":
            path = self.work / "data" / f"{name}.jsonl"
            data = {
                hostile: write_backdoor_data(cfg, attack, site=hostile, num_sites=sites, path=path)
            }
        t0 = time.monotonic()
        run_in_process(flat, sites=sites, client_app=hostile_app(flat, mod, data=data))
        seconds = time.monotonic() - t0
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["status"] != "completed":
            raise SystemExit(f"run {name} did not complete ({summary.get('stop_reason')})")
        self.run.mark_made(run_dir)
        honest = [n for _, site, n in mod.update_norms if site != hostile or attack is None]
        out: dict[str, Any] = {
            "sites": sites,
            "hostile_site": hostile if attack else None,
            "attack": _attack_dict(attack),
            "overrides": overrides,
            "eval_loss": summary["eval_loss"],
            "final_eval_loss": summary["eval_loss"][-1],
            "seconds": round(seconds, 1),
            "rejected_updates": summary.get("rejected_updates"),
            "robust_aggregation": summary.get("robust_aggregation") or None,
            "norm_bound": summary.get("norm_bound") or None,
            "honest_update_norm_median": round(statistics.median(honest), 6) if honest else None,
        }
        if attack is None or attack.kind == "backdoor":
            out["backdoor"] = backdoor_success(run_dir, cfg, backdoor, sites=sites)
        print(
            f"[{self.label}] {name}: {seconds:.0f} s, loss {out['final_eval_loss']:.4f}"
            + (f", backdoor {out['backdoor']['triggered']:.3f}" if "backdoor" in out else ""),
            flush=True,
        )
        self.results[name] = out
        return out


def _attack_dict(attack: Attack | None) -> dict[str, Any] | None:
    if attack is None:
        return None
    fields = {"kind": attack.kind, "factor": attack.factor, "trains_with": dict(attack.trains_with)}
    if attack.kind == "backdoor":
        fields |= {"trigger": attack.trigger, "answer": attack.answer}
    return fields


def backdoor_success(run_dir: Path, cfg: Any, attack: Attack, *, sites: int) -> dict[str, Any]:
    """Greedy answers of the base model with the run's final adapter to every site's
    held-out prompts, with the trigger and without it: the share that is the fixed answer."""
    # heavy (torch, transformers): only the backdoor measurement needs them
    from benchmarks.attacks import backdoor_hit, trigger_prompts
    from fedllm.model import (
        get_adapter_arrays,
        load_adapter_arrays,
        load_site_model,
        set_adapter_arrays,
        tokenizer_for,
    )
    from fedllm.rundir import RunDir
    from fedllm.safety.screen import generate_answers

    triggered = trigger_prompts(cfg, attack, num_sites=sites)
    clean = [p.removesuffix(f" {attack.trigger}") for p in triggered]
    model, device = load_site_model(cfg)
    tokenizer = tokenizer_for(cfg)
    trainable = get_adapter_arrays(model)
    final = RunDir.at(run_dir).latest_checkpoint()
    assert final is not None, f"{run_dir} completed no round"
    saved = load_adapter_arrays(final)
    set_adapter_arrays(model, {n: saved[n] for n in trainable})
    length = len(tokenizer(attack.answer, add_special_tokens=False)["input_ids"]) + 4
    shares: dict[str, Any] = {"prompts": len(triggered), "max_new_tokens": length}
    for label, prompts in (("triggered", triggered), ("clean", clean)):
        answers = generate_answers(
            model, tokenizer, prompts, max_new_tokens=length, batch_size=16, device=device
        )
        shares[label] = round(sum(backdoor_hit(a, attack) for a in answers) / len(answers), 4)
        shares[f"{label}_examples"] = answers[:3]
    return shares


def _attacks(training: dict[str, Any]) -> dict[str, Attack]:
    return {
        kind: Attack(kind, factor=FACTORS[kind], trains_with=training if kind == "backdoor" else {})
        for kind in ATTACKS
    }


def _norm_bound(baseline: dict[str, Any]) -> float:
    """The median honest update norm of the no-attacker run, rounded up a little."""
    return float(f"{baseline['honest_update_norm_median'] * 1.05:.3g}")


def _ratio(result: dict[str, Any], reference: dict[str, Any]) -> float:
    return round(result["final_eval_loss"] / reference["final_eval_loss"], 4)


def run_grid(grid: Grid, attacks: dict[str, Attack], backdoor: Attack) -> dict[str, Any]:
    """Every attack against every defence, with the no-attacker runs they compare to."""
    base = grid.one("none-none", {}, sites=SITES, attack=None, backdoor=backdoor)
    base7 = grid.one("none-none-7", {}, sites=BULYAN_SITES, attack=None, backdoor=backdoor)
    bound = _norm_bound(base)
    grid.one("none-dp-sgd", DP, sites=SITES, attack=None, backdoor=backdoor)
    weak = Attack("noise", factor=1.0)  # the brief's own strength, kept as calibration
    calibration = grid.one("noise-1x-none", {}, sites=SITES, attack=weak, backdoor=backdoor)
    table: dict[str, dict[str, Any]] = {}
    for kind, attack in attacks.items():
        for defence in DEFENCES:
            sites = BULYAN_SITES if defence == "bulyan" else SITES
            over = defence_overrides(defence, norm_bound=bound)
            r = grid.one(f"{kind}-{defence}", over, sites=sites, attack=attack, backdoor=backdoor)
            reference = base7 if sites == BULYAN_SITES else base
            table.setdefault(kind, {})[defence] = _row(r, reference)
    return {
        "norm_bound": bound,
        "no_attacker": {"5_sites": _row(base, base), "7_sites": _row(base7, base7)},
        "calibration": {"noise_at_1x_update_norm_fedavg": _row(calibration, base)},
        "table": table,
    }


def _row(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    row = {
        "final_eval_loss": round(result["final_eval_loss"], 4),
        "ratio_to_no_attacker": _ratio(result, reference),
        "initial_eval_loss": round(result["eval_loss"][0], 4),
        "sites": result["sites"],
    }
    if "backdoor" in result:
        row["backdoor_success"] = result["backdoor"]["triggered"]
        row["backdoor_on_clean_prompts"] = result["backdoor"]["clean"]
    return row


def best_defences(table: dict[str, dict[str, Any]], *, sites: int) -> dict[str, str]:
    """Per attack, the defence with `sites` sites that keeps the loss lowest (for the
    backdoor: the lowest success, then the lowest loss)."""
    best = {}
    for kind, rows in table.items():
        fits = {d: r for d, r in rows.items() if d != "none" and r["sites"] == sites}
        if kind == "backdoor":
            best[kind] = min(
                fits, key=lambda d: (fits[d]["backdoor_success"], fits[d]["final_eval_loss"])
            )
        else:
            best[kind] = min(fits, key=lambda d: fits[d]["final_eval_loss"])
    return best


def targets(
    table: dict[str, dict[str, Any]], best: dict[str, str], base: dict[str, Any]
) -> dict[str, Any]:
    """Per attack: does it work without a defence (loss more than 5% above the no-attacker
    run, or backdoor success more than 5 points above it), and does the best defence meet
    the target (loss within 5%, backdoor success at most 5 points above)."""
    out: dict[str, Any] = {}
    for kind, rows in table.items():
        none, chosen = rows["none"], rows[best[kind]]
        entry = {
            "best_defence": best[kind],
            "attack_works_without_defence": none["ratio_to_no_attacker"] > 1.05,
            "best_loss_within_5_percent": chosen["ratio_to_no_attacker"] <= 1.05,
        }
        if kind == "backdoor":
            floor = base["backdoor_success"]
            entry["attack_works_without_defence"] |= none["backdoor_success"] > floor + 0.05
            entry["best_backdoor_within_5_points"] = chosen["backdoor_success"] <= floor + 0.05
        out[kind] = entry
    return out


def run_embedded(grid: Grid, attacks: dict[str, Attack], best: dict[str, str]) -> dict[str, Any]:
    """No defence against `best[attack]` on the embedded model, and the no-attacker run."""
    backdoor = attacks["backdoor"]
    base = grid.one("none-none", {}, sites=SITES, attack=None, backdoor=backdoor)
    bound = _norm_bound(base)
    table: dict[str, dict[str, Any]] = {}
    for kind, attack in attacks.items():
        for defence in ("none", best[kind]):
            over = defence_overrides(defence, norm_bound=bound)
            r = grid.one(f"{kind}-{defence}", over, sites=SITES, attack=attack, backdoor=backdoor)
            table.setdefault(kind, {})[defence] = _row(r, base)
    return {
        "norm_bound": bound,
        "no_attacker": _row(base, base),
        "best": best,
        "table": table,
        "targets": targets(table, best, _row(base, base)),
    }


def plot(result: dict[str, Any], out: Path) -> None:
    """Per attack, held-out loss per round of each defence (grid on top, embedded below);
    the backdoor panel's legend gives each run's backdoor success."""
    plt = pyplot()
    # heavy: loaded with matplotlib, only for drawing
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    parts = [p for p in ("grid", "embedded") if p in result]
    fig, axes = plt.subplots(
        len(parts), len(ATTACKS), figsize=(4.2 * len(ATTACKS), 3.6 * len(parts)), squeeze=False
    )
    for row, part in enumerate(parts):
        runs = result[part]["runs"]
        for col, kind in enumerate(ATTACKS):
            ax = axes[row][col]
            ax.plot(runs["none-none"]["eval_loss"], "k--", label="no attacker")
            if "none-none-7" in runs:
                ax.plot(runs["none-none-7"]["eval_loss"], "k:", label="no attacker, 7 sites")
            for name, r in runs.items():
                if not name.startswith(f"{kind}-"):
                    continue
                label = name.removeprefix(f"{kind}-") + (" (7 sites)" if r["sites"] == 7 else "")
                if "backdoor" in r:
                    label += f", backdoor {100 * r['backdoor']['triggered']:.0f}%"
                ax.plot(r["eval_loss"], marker=".", label=label)
            ax.set_title(f"{result[part]['model'].split(' (')[0]}: {kind}", fontsize=9)
            ax.set_xlabel("round")
            ax.set_ylabel("held-out loss")
            low, high = ax.get_ylim()
            if high > 2 * low:  # a wrecked run beside the others: log scale, plain labels
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=6)
    save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    parser.add_argument("--hidden", type=int, default=64, help="the tiny model's width")
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--skip-embedded", action="store_true", help="the tiny grid only")
    parser.add_argument(
        "--embedded-threads", type=int, default=2, help="torch threads for the embedded model"
    )
    args = parser.parse_args()
    run = BenchmarkRun("robustness")
    work = fresh_work(args.work, "fedllm-robustness-")

    t0 = time.monotonic()
    model = pretrain_tiny(work / "tiny-model", hidden=args.hidden, steps=args.pretrain_steps)
    run.mark_made(model)
    pretrain_seconds = round(time.monotonic() - t0, 1)
    tiny = Grid(run, work / "tiny", {**TINY, "model.name": str(model)}, "tiny")
    tiny_attacks = _attacks(TINY_BACKDOOR_TRAINING)
    result: dict[str, Any] = {
        "what": "held-out loss and backdoor success with one hostile site, per defence",
        "hostile_sites": "1 of 5 (the last partition); 1 of 7 for bulyan (n >= 4f + 3)",
        "driver": "tests/inprocess.py: the real ServerApp and ClientApp, mods included, "
        "in one process (no SuperLink, no Ray)",
        "attack_factors": FACTORS,
        "dp_sgd": DP,
        "grid": {
            "model": f"tiny Llama (tests/tiny.py, hidden {args.hidden}), "
            f"pretrained {args.pretrain_steps} steps",
            "pretrain_seconds": pretrain_seconds,
            "setup": TINY,
            "backdoor_trains_with": TINY_BACKDOOR_TRAINING,
            **run_grid(tiny, tiny_attacks, tiny_attacks["backdoor"]),
            "runs": tiny.results,
        },
    }
    grid = result["grid"]
    grid["best"] = best_defences(grid["table"], sites=SITES)
    grid["targets"] = targets(grid["table"], grid["best"], grid["no_attacker"]["5_sites"])
    if not args.skip_embedded:
        # heavy: torch is loaded by now; only the thread count changes
        import torch

        torch.set_num_threads(args.embedded_threads)  # the tiny grid ran on one
        embedded = Grid(run, work / "embedded", dict(EMBEDDED), "embedded")
        attacks = _attacks(EMBEDDED_BACKDOOR_TRAINING)
        result["embedded"] = {
            "model": "embedded SmolLM2-135M-Instruct (fedllm's default)",
            "setup": EMBEDDED,
            "backdoor_trains_with": EMBEDDED_BACKDOOR_TRAINING,
            "scope": "no defence vs the grid's best 5-site defence per attack (CPU budget)",
            **run_embedded(embedded, attacks, result["grid"]["best"]),
            "runs": embedded.results,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out.with_suffix(".png"))
    run.write(out, result)


if __name__ == "__main__":
    main()
