"""`fedllm audit ...`: privacy audits of a run (ledger checks, report, canaries)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedllm.cli.common import AT_REST_HELP, at_rest_key, load_run, run_config, verb_group
from fedllm.errors import RunDirError
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir

__all__ = ["add_parsers"]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 only if every ledger of the run has an intact chain and every ε recomputes."""
    # heavy: the accountants' module (numpy) takes ~0.3 s to import; keeps `fedllm --help` fast
    from fedllm.privacy.verify import cross_check, verify_records

    path = Path(args.run)
    run = RunDir.at(path)
    ledgers = [p for p in run.ledger_paths() if p.is_file()]
    if not ledgers:
        raise RunDirError(f"{path} holds no privacy ledger (ledger.jsonl).")
    failed = False
    key = at_rest_key(args, path)
    read = {}
    for ledger_path in ledgers:
        records = read[ledger_path] = Ledger(ledger_path, key=key).records()
        problems = verify_records(records)
        for problem in problems:
            print(f"FAIL {ledger_path}: {problem}")
        if problems:
            failed = True
        else:
            print(
                f"OK   {ledger_path}: {len(records)} records, hash chain intact, "
                "every epsilon recomputed (RDP, PRV, PLD)"
            )
    sites = {int(p.parent.name.split("-")[-1]): read[p] for p in ledgers if p != run.ledger_path}
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.is_file() else None
    mismatches = cross_check(read.get(run.ledger_path, []), sites, summary)
    for problem in mismatches:
        print(f"FAIL cross-check: {problem}")
    if not mismatches:
        print(
            f"OK   cross-check: the run's ledger, {len(sites)} site ledgers in the run and "
            f"{'summary.json' if summary else 'no summary.json'} agree"
        )
    return 1 if failed or mismatches else 0


def cmd_audit_report(args: argparse.Namespace) -> int:
    # heavy: the report (numpy) takes ~0.3 s to import; keeps `fedllm --help` fast
    from fedllm.privacy.audit.report import build_report

    path, _, _ = load_run(args.run)
    html_path, md_path, problems = build_report(path, at_rest=at_rest_key(args, path))
    print(f"wrote {html_path}\nwrote {md_path}")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


def cmd_audit_canaries(args: argparse.Namespace) -> int:
    """Score an auditing run's canaries; exit 1 (after writing) if a bound beats the proof."""
    # heavy: the audit loads models (torch, datasets: ~10 s to import); keeps `fedllm --help` fast
    from fedllm.privacy.audit.empirical import AUDIT_FILE, AuditBugError, audit_run

    path, config, summary = load_run(args.run)
    try:
        result = audit_run(
            path, run_config(config), summary, device=args.device, at_rest=at_rest_key(args, path)
        )
    except AuditBugError as e:
        print(f"BUG: {e}", file=sys.stderr)
        return 1
    proven = result["proven_epsilon"]
    print(
        f"site {result['site']}: proven epsilon {proven if proven is not None else 'none'} "
        f"({result['proven_from']}), delta {result['delta']:.3g}"
    )
    for kind in ("gradient_canaries", "membership"):
        if kind in result:
            r = result[kind]
            print(
                f"  {kind}: {r['correct']}/{r['guesses']} guesses right (k={r['k']}) -> "
                f"epsilon lower bound {r['epsilon_lower_bound']:.4f} at 95% confidence"
            )
    for secret in result.get("secrets", []):
        print(
            f"  secret of {secret['name']} (x{secret['repeats']}): exposure "
            f"{secret['trained']['exposure_extrapolated']:.2f} bits trained vs "
            f"{secret['base']['exposure_extrapolated']:.2f} base"
        )
    print(f"status: {result['status']}; wrote {path / AUDIT_FILE}")
    return 0


def add_parsers(sub: Any) -> None:
    """`audit verify`, `audit report` and `audit canaries`."""
    audit = verb_group(sub, "audit", "privacy audits")
    verify = audit.add_parser("verify", help="check the ledgers' hash chains and recompute every ε")
    verify.add_argument("run", help="outputs/<run-name>")
    verify.add_argument("--at-rest-key", help=AT_REST_HELP)
    verify.set_defaults(func=cmd_audit_verify)
    report = audit.add_parser("report", help="write audit-report.html and .md into the run")
    report.add_argument("run", help="outputs/<run-name>")
    report.add_argument("--at-rest-key", help=AT_REST_HELP)
    report.set_defaults(func=cmd_audit_report)
    canaries = audit.add_parser(
        "canaries", help="score an auditing run's canaries: empirical epsilon lower bound"
    )
    canaries.add_argument("run", help="outputs/<run-name> of a run with audit.* canaries")
    canaries.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    canaries.add_argument("--at-rest-key", help=AT_REST_HELP)
    canaries.set_defaults(func=cmd_audit_canaries)
