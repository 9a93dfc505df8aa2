"""Empirical privacy audits, DP vs non-DP on the same data: `python benchmarks/canary_audit.py`.

Four federated runs (Flower Simulation Engine, 3 chatterbot sites, a small Llama that
`tests/tiny.py` builds offline so the runs take minutes on a CPU):

- record level, DP-SGD and no DP: site 0 inserts 1,000 white-box gradient canaries,
  1,000 black-box random-word canaries and 2 secrets (8 copies each); `fedllm audit
  canaries` turns them into ε lower bounds (one-run audit, 95%) and exposures;
- user level, DP-FedAvg and no DP: 1,000 canary clients at the server; the cosine statistic
  gives ε estimates and 95% lower limits.

Writes `benchmarks/results/canary_audit.json` with the lower-bound vs proven-ε table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun, add_work_arguments  # noqa: E402


def _simulate(overrides: dict, sites: int) -> None:
    from tests.simulate import simulate

    simulate(overrides, sites=sites, cpus_per_site=1)  # two actors, as when it was measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=128)
    add_work_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "canary_audit.json"))
    args = parser.parse_args()
    run = BenchmarkRun("canary_audit", allow_reuse=args.reuse)
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

    from fedllm.cli import main as cli
    from tests.tiny import make_tiny_model_dir

    work = Path(args.work or tempfile.mkdtemp(prefix="fedllm-canary-audit-"))
    model = work / "model"
    if not run.reuse(model):
        make_tiny_model_dir(model, hidden_size=args.hidden)
        run.mark_made(model)
    common = {
        "model.name": str(model),
        "run.output-dir": str(work / "runs"),
        "run.rounds": args.rounds,
        "train.local-steps": args.local_steps,
        "train.optimizer": "sgd",
        "lora.rank": 32,
        "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "train.learning-rate": 0.5,
        "data.max-length": 256,
        "eval.max-examples": 8,
    }
    record = {
        "audit.gradient-canaries": 1000,
        "audit.canaries": 1000,
        "audit.canary-length": 3,
        "audit.secrets": 2,
        "audit.secret-repeats": 8,
        "audit.secret-alternatives": 500,
    }
    runs = {
        "record-dp": {
            **common,
            **record,
            "privacy.mode": "record",
            "privacy.noise-multiplier": 1.0,
        },
        # Without DP nothing clips a record's gradient; real per-example gradients of this
        # model have norms around 10, so the canaries get that norm too (with DP they must
        # sit at the clip norm C = 1, the most a record can contribute).
        "record-nodp": {
            **common,
            **record,
            "privacy.mode": "none",
            "privacy.max-grad-norm": 10.0,
        },
        "user-dp": {
            **common,
            "privacy.mode": "user",
            "privacy.user-noise-multiplier": 1.0,
            "privacy.user-clip": 0.5,
            "audit.canary-clients": 1000,
        },
        "user-nodp": {
            **common,
            "privacy.mode": "none",
            "privacy.user-clip": 0.5,
            "audit.canary-clients": 1000,
        },
    }
    table, seconds = {}, {}
    for name, overrides in runs.items():
        t0 = time.monotonic()
        run_dir = work / "runs" / name
        reused = run.reuse(run_dir)
        if not reused:
            _simulate({**overrides, "run.name": name}, sites=3)
            if json.loads((run_dir / "summary.json").read_text())["status"] != "completed":
                raise SystemExit(f"run {name} did not complete; see {run_dir}")
            run.mark_made(run_dir)
        if name.startswith("record"):
            code = cli(["audit", "canaries", str(run_dir)])
            audit = json.loads((run_dir / "audit" / "empirical.json").read_text())
            table[name] = {"exit_code": code, **audit}
        else:
            table[name] = json.loads((run_dir / "audit" / "canary-clients.json").read_text())
        # A reused run was trained elsewhere (named in provenance): here only its audit ran.
        seconds[name] = {"seconds": round(time.monotonic() - t0, 1), "trained_here": not reused}
        print(name, json.dumps(table[name], indent=1)[:1500], flush=True)
    out = {
        "what": "empirical epsilon lower bounds, DP vs non-DP on the same data",
        "setup": {
            **common,
            "model.name": f"tests/tiny.py Llama, hidden {args.hidden}",
            "run.output-dir": None,
            "sites": 3,
            "auditing_site": 0,
        },
        "seconds": seconds,
        "runs": table,
    }
    run.write(args.out, out)


if __name__ == "__main__":
    main()
