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


def _site_ledger_args(specs: list[str]) -> dict[int, Path]:
    """`--site-ledger K=PATH`: a site's own ledger of this run, kept at the site."""
    out = {}
    for spec in specs:
        site, sep, path = spec.partition("=")
        if not sep or not site.strip().isdigit():
            raise RunDirError(
                f"--site-ledger {spec!r}: give SITE=PATH (e.g. 0=state/ledger.jsonl)."
            )
        out[int(site)] = Path(path)
    return out


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 only if every ledger of the run has an intact chain, every ε recomputes, the
    ledgers and the summary agree, and (for a signed run) every signature verifies."""
    # heavy: the accountants' module (numpy) takes ~0.3 s to import; keeps `fedllm --help` fast
    from fedllm.privacy.verify import cross_check, verify_records

    path = Path(args.run)
    run = RunDir.at(path)
    site_paths = {
        int(p.parent.name.split("-")[-1]): p
        for p in run.ledger_paths()
        if p != run.ledger_path and p.is_file()
    }
    site_paths.update(_site_ledger_args(args.site_ledger or []))
    if not run.ledger_path.is_file() and not site_paths:
        raise RunDirError(f"{path} holds no privacy ledger (ledger.jsonl).")
    failed = False
    key = at_rest_key(args, path)
    read: dict[Path, list[dict[str, Any]]] = {}
    ledgers = ([run.ledger_path] if run.ledger_path.is_file() else []) + list(site_paths.values())
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
    run_records = read.get(run.ledger_path, [])
    sites = {site: read[p] for site, p in site_paths.items()}
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.is_file() else None
    mismatches = cross_check(run_records, sites, summary)
    for problem in mismatches:
        print(f"FAIL cross-check: {problem}")
    if not mismatches:
        print(
            f"OK   cross-check: the run's ledger, {len(sites)} site ledgers and "
            f"{'summary.json' if summary else 'no summary.json'} agree"
        )
    signed = _verify_signed(args, run, run_records, sites, summary)
    return 1 if failed or mismatches or signed else 0


def _verify_signed(
    args: argparse.Namespace,
    run: RunDir,
    run_records: list[dict[str, Any]],
    sites: dict[int, list[dict[str, Any]]],
    summary: dict[str, Any] | None,
) -> list[str]:
    """The signatures: the registry under the coordinator's key, every site record under its
    site's key, the manifest under the coordinator's. Returns the problems printed."""
    # heavy: cryptography loads only for a signed run
    from fedllm.privacy.manifest import load_manifest, verify_manifest
    from fedllm.privacy.signed_ledgers import verify_signed_ledgers
    from fedllm.secure.registry import load_public_key, load_registry, named_coordinator_key

    manifest = load_manifest(run.manifest_path)
    security = (summary or {}).get("security") or {}
    registry_path = args.registry or security.get("registry")
    if manifest is None and not security.get("sign_updates"):
        print(
            "NOTE unsigned run (security.sign-updates off): the checks above hold only "
            "against edits, not against whoever can rewrite every file consistently"
        )
        return []
    problems: list[str] = []
    if manifest is None:
        problems.append(f"{run.manifest_path}: a signed run must have a manifest; it is missing")
    if not registry_path or not Path(registry_path).is_file():
        problems.append(
            f"the registry {registry_path or '(none named)'} is not here; pass --registry PATH"
        )
    else:
        if args.coordinator_key:
            coordinator = load_public_key(Path(args.coordinator_key))
            source = str(args.coordinator_key)
        else:  # the registry's own statement of the key: say so
            coordinator = named_coordinator_key(Path(registry_path))
            source = "the key the registry names (pass --coordinator-key for your own copy)"
        registry = load_registry(Path(registry_path), coordinator)
        print(f"OK   registry {registry_path}: signed by the coordinator's key, from {source}")
        problems += verify_signed_ledgers(run_records, sites, registry.sites)
        if manifest is not None:
            problems += verify_manifest(
                manifest,
                coordinator,
                run_dir=run.path,
                run_records=run_records,
                site_records=sites,
            )
    for problem in problems:
        print(f"FAIL signatures: {problem}")
    if not problems:
        print(
            "OK   signatures: every site record verifies under its site's registered key; "
            "the manifest (ledger lengths and heads, checkpoint, config) verifies under the "
            "coordinator's"
        )
    return problems


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
    verify.add_argument("--registry", help="the signed registry (default: the summary's)")
    verify.add_argument("--coordinator-key", help="your copy of the coordinator's public key")
    verify.add_argument(
        "--site-ledger",
        action="append",
        metavar="SITE=PATH",
        help="a site's own ledger of this run (repeatable), e.g. from its state-dir",
    )
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
