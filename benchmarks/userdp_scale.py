"""User-level DP that learns at scale: `python -m benchmarks.userdp_scale`.

1,000 simulated sites, each an iid share of the embedded chatterbot corpus (~2 records a
site), 100 Poisson-sampled a round (q = 0.1) for five rounds, DP-FedAvg at ε ≤ 4 over the
whole run (δ = 1e-6), on the embedded SmolLM2-135M-Instruct, side by side with the same run
without DP. Every run is fedllm's real ServerApp and ClientApp, mods included
(`tests/inprocess.py`: in this process, without a SuperLink or Ray). Held-out loss is
measured each round (and round 0) on a fixed cohort of `eval.sites` sites.

Why so few trainable parameters: at qN = 100 sites a round the noise on the mean update is
z·S/100 per coordinate, so its norm is z·S·√d/100 against a mean of norm at most S. FFA-LoRA
(A frozen, only B trained) of rank 1 on `v_proj` of every layer trains d = 30 · 192 = 5,760
values: noise norm ≈ 0.66·S at z ≈ 0.86. One local AdamW step moves each coordinate by at
most the learning rate (its first step is lr·g/(|g| + eps)), so every update's norm is at
most lr·√d; the clip S is set to exactly that, and clipping never binds: the DP and the
non-DP run then average the same updates, and differ only in what `differs` in the result
says.

The local learning rate (0.004) comes from an offline calibration on the embedded model
(the site's own `train_local` and `evaluate`, no federation): the mean of 40 sites' one-step
updates at the initial adapter had an RMS of 0.44 per coordinate (0.16 would be chance), and
one step of it at lr 0.003 took the held-out loss of 20 sites from 2.657 to 2.533 (five such
steps: 2.261), at lr 0.01 to 2.321 (five: 2.494, overshot); the noise a qN = 100 round adds at
z = 0.86 changed none of these by more than 0.03.

z is the smallest noise multiplier that fedllm's own accountant code (`calibrate_noise`,
Opacus' PRV) gives for ε = 4 at δ = 1e-6 over the run's rounds at q; the ε recorded is
`epsilon_report` (PRV, PLD, RDP) of that history, as the run's ledger states it. Writes
`benchmarks/results/userdp_scale.json` and `userdp_scale.png` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import BenchmarkRun, fresh_work, peak_rss_mib  # noqa: E402

TARGET_EPSILON = 4.0
DELTA = 1e-6

# What both sides share: one local step on each site's few records, a rank-1 FFA-LoRA on
# v_proj only (few parameters: see the module docstring), short sequences.
COMMON: dict[str, Any] = {
    "data.partitioner": "iid",
    "data.max-length": 80,
    "lora.ffa": True,
    "lora.rank": 1,
    "lora.target-modules": "v_proj",
    "train.local-steps": 1,
    "train.batch-size": 4,
    "train.physical-batch-size": 4,
    "train.optimizer": "adamw",
    "eval.max-examples": 2,
    "eval.batch-size": 8,
    "run.min-sites": 1,
}


def noise_multiplier(*, q: float, rounds: int) -> tuple[float, dict[str, Any]]:
    """The least z (3 decimals, rounded up) whose `rounds` Poisson-sampled Gaussian steps at
    `q` spend at most TARGET_EPSILON at DELTA by fedllm's accountant code, and its ε report."""
    # heavy (opacus, dp-accounting): only the benchmark's setup needs them
    from fedllm.privacy.accounting import calibrate_noise, epsilon_report

    z = calibrate_noise(
        target_epsilon=TARGET_EPSILON, delta=DELTA, sample_rate=q, steps=rounds, mechanism="prv"
    )
    z = math.ceil(z * 1000) / 1000
    report = epsilon_report([(z, q, rounds)], delta=DELTA)
    if report["epsilon"] > TARGET_EPSILON:
        raise SystemExit(f"z = {z} spends epsilon {report['epsilon']} > {TARGET_EPSILON}")
    return z, {k: (float(v) if not isinstance(v, bool) else v) for k, v in report.items()}


def trainable_count(flat: dict[str, Any]) -> int:
    """How many values the run's adapter trains (and a site sends)."""
    # heavy (torch, transformers): only the benchmark's setup needs them
    from fedllm.config import parse_config
    from fedllm.model import get_adapter_arrays, load_site_model

    model, _ = load_site_model(parse_config(flat))
    return int(sum(a.size for a in get_adapter_arrays(model).values()))


def run_side(name: str, flat: dict[str, Any], *, sites: int, work: Path) -> dict[str, Any]:
    """One run through the real apps; its held-out loss per round and its cost."""
    # heavy (the apps, Flower, torch): imported once the benchmark runs
    from tests.inprocess import run_in_process

    run_dir = work / "runs" / name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} already exists; give a fresh --work directory.")
    flat = {**flat, "run.name": name, "run.output-dir": str(work / "runs")}
    t0 = time.monotonic()
    run_in_process(flat, sites=sites)
    seconds = time.monotonic() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] != "completed":
        raise SystemExit(f"run {name} did not complete ({summary.get('stop_reason')})")
    out: dict[str, Any] = {
        "eval_loss": summary["eval_loss"],
        "loss_fell": summary["eval_loss"][-1] < summary["eval_loss"][0],
        "seconds": round(seconds, 1),
        "max_rss_gib_so_far": round(peak_rss_mib() / 1024, 2),
        "run_dir": str(run_dir),
    }
    if "user_level" in summary:
        out["user_level"] = summary["user_level"]
    print(f"{name}: {seconds:.0f} s, held-out loss {summary['eval_loss']}", flush=True)
    return out


def plot(result: dict[str, Any], out: Path) -> None:
    """Held-out loss per round, DP and non-DP side by side."""
    plt = pyplot()
    # heavy: loaded with matplotlib, only for drawing
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    s = result["setup"]
    for name, style in (("no-dp", "k--"), ("user-dp", "b-")):
        if name in result["runs"]:
            label = name if name == "no-dp" else f"user-level DP, ε={result['epsilon']:.2f}"
            ax.plot(result["runs"][name]["eval_loss"], style, marker=".", label=label)
    ax.set_title(
        f"{s['sites']} sites, q={s['q']}, z={s['z']}, S={s['clip']:.3g}, d={s['trainable']}",
        fontsize=9,
    )
    ax.set_xlabel("round")
    ax.set_ylabel(f"held-out loss ({s['eval_sites']} sites)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    save_figure(fig, out)


def save(run: BenchmarkRun, result: dict[str, Any], out: Path) -> None:
    """The result as JSON and its plot beside it (same name, .png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out.with_suffix(".png"))
    run.write(out, result)


def combine(parts: list[Path], out: Path) -> None:
    """One result from runs of one side each (the same setup), with each part's provenance."""
    loaded = [json.loads(p.read_text()) for p in parts]
    result = {k: v for k, v in loaded[0].items() if k not in _PROVENANCE}
    result["runs"] = {}
    result["parts"] = []
    for part, path in zip(loaded, parts, strict=True):
        if part["setup"] != result["setup"]:
            raise SystemExit(f"{path} has another setup than {parts[0]}; not combined.")
        result["runs"].update(part["runs"])
        result["parts"].append({"path": str(path), "provenance": part["provenance"]})
    save(BenchmarkRun("userdp_scale"), result, out)


def parallel(args: argparse.Namespace) -> None:
    """Each side in its own process under --work (its log beside its JSON), then combined:
    two single-threaded processes keep both of 2 cores busy where one step alone does not."""
    work = fresh_work(args.work, "fedllm-userdp-scale-")
    drop = {"--parallel", "--work", "--out", "--sides"}
    base, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in drop:
            skip = arg != "--parallel"
        elif not arg.startswith(tuple(f"{d}=" for d in drop)):
            base.append(arg)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    procs = []
    for side in sides:
        cmd = [sys.executable, "-m", "benchmarks.userdp_scale", *base, "--threads", "1"]
        cmd += ["--sides", side, "--work", str(work / side), "--out", str(work / f"{side}.json")]
        with (work / f"{side}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        print(f"{side}: {shlex.join(cmd)} (log {work / f'{side}.log'})", flush=True)
    failed = [side for side, p in zip(sides, procs, strict=True) if p.wait() != 0]
    if failed:
        raise SystemExit(f"side(s) {', '.join(failed)} failed; see their logs in {work}.")
    combine([work / f"{side}.json" for side in sides], Path(args.out))


_PROVENANCE = ("benchmark", "provenance")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "userdp_scale.json"))
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--q", type=float, default=0.1, help="strategy.fraction-train")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eval-sites", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.004, help="local AdamW learning rate")
    parser.add_argument("--model", default="", help="model.name (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--sides", default="no-dp,user-dp", help="which runs, in this order")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run each side in its own process (one torch thread each), then combine",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="merge the results of runs made one side each (two processes) into --out",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="another config key"
    )
    args = parser.parse_args()
    if args.combine:
        combine([Path(p) for p in args.combine], Path(args.out))
        return
    if args.parallel:
        parallel(args)
        return
    # heavy: torch is needed for the runs anyway; only the thread count is set here
    import torch

    torch.set_num_threads(args.threads)
    run = BenchmarkRun("userdp_scale")
    work = fresh_work(args.work, "fedllm-userdp-scale-")

    common = {
        **COMMON,
        "run.rounds": args.rounds,
        "strategy.fraction-train": args.q,
        "train.learning-rate": args.lr,
        "eval.sites": args.eval_sites,
    }
    if args.model:
        common["model.name"] = args.model
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            common[key] = json.loads(value)  # numbers and booleans
        except json.JSONDecodeError:
            common[key] = value
    d = trainable_count(common)
    clip = args.lr * math.sqrt(d)  # the most one AdamW step can move d values
    z, report = noise_multiplier(q=args.q, rounds=args.rounds)
    expected = args.q * args.sites
    sides = {
        "no-dp": {**common, "privacy.mode": "none"},
        "user-dp": {
            **common,
            "privacy.mode": "user",
            "privacy.user-noise-multiplier": z,
            "privacy.user-clip": clip,
            "privacy.user-clipping": "fixed",
            "privacy.user-delta": DELTA,
            "privacy.user-epsilon-max": TARGET_EPSILON,
        },
    }
    result: dict[str, Any] = {
        "what": "held-out loss per round, user-level DP-FedAvg against the same run without DP",
        "driver": "tests/inprocess.py: the real ServerApp and ClientApp, mods included, "
        "in one process (no SuperLink, no Ray)",
        "model": args.model or "embedded SmolLM2-135M-Instruct (fedllm's default)",
        "data": f"chatterbot corpus, iid partition into {args.sites} sites",
        "setup": {
            "sites": args.sites,
            "q": args.q,
            "expected_sites_per_round": expected,
            "rounds": args.rounds,
            "eval_sites": args.eval_sites,
            "z": z,
            "clip": clip,
            "clip_rule": "S = lr * sqrt(d): the largest norm one AdamW step can have, so "
            "clipping never binds",
            "noise_std_per_coordinate": z * clip / expected,
            "noise_norm_over_clip": z * math.sqrt(d) / expected,
            "trainable": d,
            "lora": "FFA-LoRA rank 1 on v_proj of every layer (A frozen, only B trained)",
            "learning_rate": args.lr,
            "common": common,
            "sides": {k: {n: v for n, v in o.items() if n not in common} for k, o in sides.items()},
        },
        "epsilon": report["epsilon"],
        "delta": DELTA,
        "accountant": report,
        "differs": "no-dp: privacy.mode none, so Flower's FedAvg asks exactly q*N sites a round "
        "(a uniform sample without replacement), averages their adapters weighted by record "
        "count, without clipping or noise. user-dp: each site Poisson-sampled with "
        "probability q, each update clipped to S (never binding here), N(0, z^2 S^2) added "
        "to the sum, divided by the expected count qN. Same data, model, adapter, local "
        "training and evaluation cohort.",
        "runs": {},
    }
    for name in [s.strip() for s in args.sides.split(",") if s.strip()]:
        result["runs"][name] = run_side(name, sides[name], sites=args.sites, work=work)
        run.mark_made(work / "runs" / name)
    save(run, result, Path(args.out))


if __name__ == "__main__":
    main()
