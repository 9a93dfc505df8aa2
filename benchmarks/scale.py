"""Sites on one machine: coordinator memory and time per round at 10, 100 and 1,000 sites.

`python benchmarks/scale.py` runs fedllm's real ServerApp and ClientApp on Flower's
Simulation Engine (Ray) with 10, 100 and 1,000 virtual sites, a tenth of them sampled each
round (1, 10 and 100), each site holding an iid share of the embedded chatterbot records,
and a fixed cohort of 5 sites evaluating. Every configuration runs twice, side by side in
this one invocation: with streaming aggregation (each reply folded as it arrives, the
default) and without (the round's replies collected first, as Flower's `send_and_receive`
returns them). Each run is its own process, so its peak resident memory (`ru_maxrss`) is
its own: the ServerApp, the simulation engine and its link state live in that process, the
sites in Ray's worker processes.

The model is the tiny Llama of `tests/tiny.py` (hidden 256) with LoRA of rank 64 on every
projection, so that each update weighs a few MB and a round's replies are visible beside the
process's fixed cost (torch, transformers, Ray, Flower). Writes
`benchmarks/results/scale.json` and `scale.png` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import BenchmarkRun, fresh_work, peak_rss_mib  # noqa: E402

SITES = (10, 100, 1000)
FRACTION = 0.1
COHORT = 5
ROUNDS = 2
SETUP = {
    "run.rounds": ROUNDS,
    "run.min-sites": 1,
    "run.timeout": 1800.0,
    "strategy.fraction-train": FRACTION,
    "eval.sites": COHORT,
    "eval.max-examples": 4,
    "privacy.mode": "none",
    "data.partitioner": "iid",
    "lora.rank": 64,
    "lora.ffa": False,  # A and B both travel: a bigger update to hold
    "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "train.local-steps": 1,
    "train.batch-size": 4,
    "train.physical-batch-size": 4,
}


def one(sites: int, streaming: bool, work: Path, model: Path) -> dict[str, Any]:
    """One simulated run in this process; its figures and the process's peak memory."""
    # heavy: the apps (torch, transformers, Flower) load only in the child that runs
    from tests.simulate import simulate

    overrides = {
        **SETUP,
        "model.name": str(model),
        "run.name": f"sites-{sites}-{'streaming' if streaming else 'listed'}",
        "run.output-dir": str(work),
        "strategy.streaming": streaming,
    }
    before = peak_rss_mib()
    t0 = time.monotonic()
    simulate(overrides, sites=sites, cpus_per_site=1, total_cpus=2)
    wall = time.monotonic() - t0
    summary = json.loads((work / overrides["run.name"] / "summary.json").read_text())
    trained = [len(p["aggregated"]) for p in summary["participation"]]
    return {
        "sites": sites,
        "streaming": streaming,
        "status": summary["status"],
        "sampled_per_round": trained,
        "round_seconds": summary["round_seconds"],
        "seconds_per_sampled_site": [
            round(s / n, 3) for s, n in zip(summary["round_seconds"], trained, strict=True) if n
        ],
        "upload_bytes_per_round": [b["up"] for b in summary["bytes_per_round"] if b["round"]],
        "eval_loss": summary["eval_loss"],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_run_mib": round(before, 1),
        "wall_seconds": round(wall, 1),
    }


def _child(sites: int, streaming: bool, work: Path, model: Path) -> dict[str, Any]:
    """`one` in a fresh process (its own peak memory); its result is the last stdout line."""
    cmd = [sys.executable, __file__, "--one", str(sites), str(int(streaming)), str(work)]
    cmd += ["--model", str(model)]
    print(f"  {sites} sites, streaming {streaming} ...", flush=True)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-scale-")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        lines = (done.stderr + done.stdout).splitlines()
        said = [line for line in lines if "fedllm:" in line] or lines[-3:]
        raise SystemExit(f"the run at {sites} sites failed: " + " | ".join(said[-3:]))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"    {result['status']}: rounds {result['round_seconds']} s, peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return result


def plot(result: dict[str, Any], out: Path) -> None:
    """Time per round against sites sampled, and peak memory against sites."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for streaming, style in ((True, "o-"), (False, "s--")):
        runs = [r for r in result["runs"] if r["streaming"] is streaming]
        label = "streaming" if streaming else "replies collected first"
        sampled = [max(r["sampled_per_round"]) for r in runs]
        seconds = [max(r["round_seconds"][1:]) for r in runs]
        left.plot(sampled, seconds, style, label=label)
        right.plot(
            [r["sites"] for r in runs], [r["peak_rss_mib"] for r in runs], style, label=label
        )
    left.set(xlabel="sites sampled a round", ylabel="seconds per round", title="time per round")
    right.set(
        xlabel="sites in the federation", ylabel="peak RSS (MiB)", xscale="log",
        title="coordinator process memory",
    )  # fmt: skip
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.legend(fontsize=8)
    save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--sites", default=",".join(map(str, SITES)))
    parser.add_argument(
        "--one", nargs=3, metavar=("SITES", "STREAMING", "WORK"), help=argparse.SUPPRESS
    )
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sites, streaming, work = args.one
        print(json.dumps(one(int(sites), bool(int(streaming)), Path(work), Path(args.model))))
        return
    run = BenchmarkRun("scale")
    work = fresh_work(args.work, "fedllm-scale-")
    # heavy: torch and transformers, for the tiny model only
    from tests.tiny import make_tiny_model_dir

    model = make_tiny_model_dir(work / "tiny-model", hidden_size=256)
    run.mark_made(model)
    runs = []
    for sites in map(int, args.sites.split(",")):
        for streaming in (True, False) if sites % 20 else (False, True):  # A B, then B A
            runs.append(_child(sites, streaming, work, model))
    by = {(r["sites"], r["streaming"]): r for r in runs}
    counts = sorted({r["sites"] for r in runs})
    result: dict[str, Any] = {
        "what": "coordinator peak memory and time per round against the number of sites",
        "driver": "Flower's Simulation Engine (tests/simulate.py), one Ray actor per core",
        "model": "tiny Llama (tests/tiny.py, hidden 256), LoRA rank 64 (A and B) on every "
        "projection",
        "setup": SETUP,
        "memory_note": "peak RSS of the process running the ServerApp and the simulation "
        "engine (sites run in Ray's worker processes)",
        "runs": runs,
    }
    if 100 in counts and 1000 in counts:
        s100, s1000 = by[(100, True)], by[(1000, True)]
        ratio = s1000["peak_rss_mib"] / s100["peak_rss_mib"]
        result["targets"] = {
            "sites_1000_completed": s1000["status"] == "completed",
            "memory_1000_over_100_streaming": round(ratio, 3),
            "memory_within_10_percent": ratio <= 1.10,
            "memory_1000_over_100_listed": round(
                by[(1000, False)]["peak_rss_mib"] / by[(100, False)]["peak_rss_mib"], 3
            ),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out.with_suffix(".png"))
    run.write(out, result)


if __name__ == "__main__":
    main()
