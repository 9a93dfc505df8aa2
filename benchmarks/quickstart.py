"""The README's quickstart, timed end to end: `python benchmarks/quickstart.py`.

Runs `flwr run . --stream` from this checkout in a fresh `FLWR_HOME` that holds only the
connection `./install.sh` adds (`fedllm federation setup --sites 3 --cpus 2`), so nothing
from an earlier run is reused. Every config key keeps its default except `run.name` and
`run.output-dir`, set so the run directory is known (neither changes what is computed).
Then `fedllm audit verify` and `fedllm audit report` run on the result, and the report is
copied next to the JSON.

Writes `benchmarks/results/quickstart_flwr_run.json` (and `quickstart_audit_report/`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun, fresh_work  # noqa: E402

RUN_NAME = "quickstart"


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run `cmd` in the checkout, its output streamed to the terminal and to `log`."""
    t = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
        code = proc.wait()
    return code, time.monotonic() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quickstart_flwr_run.json"))
    args = parser.parse_args()
    run = BenchmarkRun("quickstart_flwr_run")
    work = fresh_work(args.work, "fedllm-quickstart-")
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    fedllm = str(Path(sys.executable).with_name("fedllm"))
    flwr = str(Path(sys.executable).with_name("flwr"))
    code, _ = run_logged(
        [fedllm, "federation", "setup", "--sites", "3", "--cpus", "2"], env, work / "setup.log"
    )
    if code:
        raise SystemExit(f"fedllm federation setup failed ({code}); see {work / 'setup.log'}")
    outputs = work / "outputs"
    overrides = f"run.name='{RUN_NAME}' run.output-dir='{outputs}'"
    command = [flwr, "run", ".", "--stream", "--run-config", overrides]
    code, wall = run_logged(command, env, work / "flwr-run.log")
    run_dir = outputs / RUN_NAME
    summary_file = run_dir / "summary.json"
    if code or not summary_file.is_file():
        raise SystemExit(f"`flwr run` failed ({code}); see {work / 'flwr-run.log'}")
    summary = json.loads(summary_file.read_text())
    if summary["status"] != "completed":
        raise SystemExit(f"the run stopped: {summary['status']}; see {run_dir}")
    verify = subprocess.run(
        [fedllm, "audit", "verify", str(run_dir)], env=env, capture_output=True, text=True
    )
    report = subprocess.run(
        [fedllm, "audit", "report", str(run_dir)], env=env, capture_output=True, text=True
    )
    if verify.returncode or report.returncode:
        raise SystemExit(f"audit failed:\n{verify.stdout}{verify.stderr}{report.stderr}")
    report_dir = Path(args.out).with_name("quickstart_audit_report")
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    for name in ("audit-report.html", "audit-report.md"):
        shutil.copy2(run_dir / name, report_dir / name)
    sites = summary["sites"]
    result = {
        "what": "the README's `flwr run . --stream`, every model/data/privacy key at its default",
        "flwr_run_command": " ".join([*command[:-1], repr(overrides)]),
        "wall_seconds": round(wall, 1),
        "sites": len(sites),
        "rounds": summary["rounds_completed"],
        "round_seconds": summary["round_seconds"],
        "bytes_per_round": summary["bytes_per_round"],
        "global_eval_loss": summary["eval_loss"],
        "site_eval_loss": {k: s["eval_loss"] for k, s in sites.items()},
        "epsilon_guarantee": summary["epsilon"],
        "delta": summary["delta"],
        "epsilon_by_accountant": summary["epsilon_by_accountant"],
        "audit_verify": {"exit_code": verify.returncode, "output": verify.stdout.strip()},
        "audit_report": str(
            report_dir.relative_to(ROOT) if report_dir.is_relative_to(ROOT) else report_dir
        ),
        "versions_in_summary": summary["versions"],
    }
    run.write(args.out, result)


if __name__ == "__main__":
    main()
