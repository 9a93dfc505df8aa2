"""Safety screening of the embedded model, before and after federated training:
`python benchmarks/safety_screening.py`.

1. Runs the quickstart (`flwr run . --stream`, every key at its default) with screening on
   every round (`safety.screen-every=1`): the coordinator screens the base model as round 0
   and each round's global model on `bundled:probes-fast` with the default filter
   (``lexicon``), and applies the interval gate. Its `summary.json` gives, per round, the two rates
   and how the harmful probes' answers split (refused, flagged and not refused, ...).
2. Then asks the base model and the final global model the full `bundled:probes` (200 harmful,
   200 benign), once each, and scores the same answers with every filter (``response``, which
   reads the prompt, and the answer-only ``embedding`` and ``lexicon``), so the split shows
   whether harmful compliance moves with the filter or only with refusals. The gate is
   applied to the full set too, with the smallest rise it can detect.

Writes `benchmarks/results/safety_screening.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun, fresh_work  # noqa: E402
from benchmarks.quickstart import run_logged  # noqa: E402

RUN_NAME = "screening"
FILTERS = ("response", "embedding", "lexicon")


def _federated_run(work: Path) -> tuple[Path, str, float]:
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    fedllm = str(Path(sys.executable).with_name("fedllm"))
    flwr = str(Path(sys.executable).with_name("flwr"))
    setup = [fedllm, "federation", "setup", "--sites", "3", "--cpus", "2"]
    if run_logged(setup, env, work / "setup.log")[0]:
        raise SystemExit(f"fedllm federation setup failed; see {work / 'setup.log'}")
    outputs = work / "outputs"
    overrides = f"run.name='{RUN_NAME}' run.output-dir='{outputs}' safety.screen-every=1"
    command = [flwr, "run", ".", "--stream", "--run-config", overrides]
    code, wall = run_logged(command, env, work / "flwr-run.log")
    run_dir = outputs / RUN_NAME
    if code or not (run_dir / "summary.json").is_file():
        raise SystemExit(f"`flwr run` failed ({code}); see {work / 'flwr-run.log'}")
    return run_dir, " ".join([*command[:-1], repr(overrides)]), wall


def _screen_full(run_dir: Path) -> dict[str, Any]:
    """Base and final model on the full probe set, one generation each, every filter."""
    from fedllm.cli.common import run_config
    from fedllm.model import (
        get_adapter_arrays,
        load_adapter_arrays,
        load_site_model,
        set_adapter_arrays,
        tokenizer_for,
    )
    from fedllm.rundir import RunDir
    from fedllm.safety.filters import create_filter
    from fedllm.safety.screen import (
        detectable_rise,
        gate,
        generate_answers,
        load_probes,
        score_answers,
    )

    cfg = run_config(json.loads((run_dir / "config.json").read_text()))
    probes = load_probes("bundled:probes")
    model, device = load_site_model(cfg)
    tokenizer = tokenizer_for(cfg)
    initial = {k: v.copy() for k, v in get_adapter_arrays(model).items()}
    final_dir = RunDir.at(run_dir).latest_checkpoint()
    assert final_dir is not None, "the run completed no round"
    filters = {name: create_filter(name, device="cpu") for name in FILTERS}
    out: dict[str, Any] = {"probes": probes.source, "harmful": int(probes.harmful.sum())}
    screened: dict[str, Any] = {}
    saved = load_adapter_arrays(final_dir)
    final = {n: saved[n] for n in initial}  # the trainable tensors (a checkpoint holds all)
    for label, arrays in (("base", initial), ("final", final)):
        set_adapter_arrays(model, arrays)
        t0 = time.perf_counter()
        answers = generate_answers(
            model,
            tokenizer,
            probes.prompts,
            max_new_tokens=cfg.safety.max_new_tokens,
            batch_size=16,
            device=device,
        )
        seconds = time.perf_counter() - t0
        screened[label] = {name: score_answers(probes, answers, f) for name, f in filters.items()}
        out[label] = {
            "generation_seconds": round(seconds, 1),
            "by_filter": {name: r.to_dict() for name, r in screened[label].items()},
            "examples": [
                {"prompt": p[:120], "answer": a[:240]}
                for p, a, h in zip(probes.prompts, answers, probes.harmful, strict=True)
                if h
            ][:5],
        }
    base = screened["base"]["response"].harmful_compliance
    out["gate_on_full_probes"] = {
        **gate(base, screened["final"]["response"].harmful_compliance, 0.0).to_dict(),
        "detectable_rise_points": detectable_rise(base, 0.0),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/safety_screening.json"))
    args = parser.parse_args()
    run = BenchmarkRun("safety_screening")
    work = fresh_work(args.work, "fedllm-screening-")
    run_dir, command, wall = _federated_run(work)
    run.mark_made(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    safety = summary["safety"]
    result = {
        "flwr_run_command": command,
        "wall_seconds": round(wall, 1),
        "eval_loss": summary["eval_loss"],
        "epsilon_guarantee": summary["epsilon"],
        "per_round_screening": {
            "filter": safety["filter"],
            "probes": safety["probes"],
            "probe_counts": safety["probe_counts"],
            "gate": safety["gate"],
            "base": safety["base"],
            "rounds": safety["rounds"],
            "rollbacks": safety["rollbacks"],
        },
        "full_probe_set": _screen_full(run_dir),
    }
    run.write(args.out, result)
    for label in ("base", "final"):
        row = result["full_probe_set"][label]["by_filter"]
        print(label, {k: v["harmful_answers"] for k, v in row.items()})


if __name__ == "__main__":
    main()
