"""`fedllm site init` (a site's own keys), `fedllm site app-hash` (the app it pins) and
`fedllm site budget` (its lifetime privacy spend on each of its datasets)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.errors import ConfigError

__all__ = ["add_parsers"]


def budget_lines(state_dir: Path, *, cap: float | None, key: Any = None) -> list[str]:
    """One block per lifetime ledger under `state_dir`: its runs (rounds, and ε within each
    run) and the ε of every spend composed, against the site's cap."""
    # heavy: the accountants load only here
    from fedllm.privacy.accounting import epsilon_report
    from fedllm.privacy.ledger import DP_SGD, Ledger
    from fedllm.site import PrivacyState  # heavy: as above (and torch)
    from fedllm.site_ledgers import LIFETIME_DIR

    ledgers = sorted((state_dir / LIFETIME_DIR).glob("*.jsonl"))
    if not ledgers:
        raise ConfigError(
            f"no lifetime ledger under {state_dir / LIFETIME_DIR}; is it the state-dir?"
        )
    out = []
    for path in ledgers:
        records = Ledger(path, key=key).records()
        state = PrivacyState.from_ledger(records)  # the composed history and its last delta
        spends = [r for r in records if r.get("mechanism") == DP_SGD]
        lifetime = (
            float(epsilon_report(state.history, delta=state.delta)["epsilon"]) if spends else 0.0
        )
        limit = f"cap {cap:g}: {'within' if lifetime <= cap else 'PAST'}" if cap else "no cap"
        out.append(f"records {path.stem[:16]}…: lifetime epsilon {lifetime:.4f} ({limit})")
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in spends:
            runs.setdefault(str(r["run_id"]), []).append(r)
        for run, records in runs.items():
            out.append(
                f"  run {run}: {len(records)} rounds, epsilon within the run "
                f"{float(records[-1]['guarantee']):.4f}"
            )
    return out


def cmd_site_budget(args: argparse.Namespace) -> int:
    # heavy: cryptography (at-rest keys) and the config machinery load only for this verb
    from fedllm.secure.at_rest import configured_key
    from fedllm.site_policy import load_policy  # heavy: as above

    caps = [c for c in (args.epsilon_max,) if c]
    if args.policy:
        policy_cap = load_policy(args.policy).cap(None)
        caps += [policy_cap] if policy_cap else []
    key = configured_key(args.at_rest_key or "")
    lines = budget_lines(Path(args.state_dir), cap=min(caps) if caps else None, key=key)
    print("\n".join(lines))
    return 0


def cmd_site_init(args: argparse.Namespace) -> int:
    # heavy: cryptography loads only for this verb
    from fedllm.secure.site_keys import SiteKeys, init_site

    out = Path(args.out or f"keys/site/{args.name}")
    enrolment = init_site(
        out,
        args.name,
        ca=Path(args.ca) if args.ca else None,
        coordinator_key=Path(args.coordinator_key) if args.coordinator_key else None,
        force=args.force,
    )
    keys = SiteKeys(out)
    print(f"site {args.name!r}: keys made here, at {out}; no private key leaves this folder")
    print(f"  {keys.node_auth_key} (0600): node authentication (P-384)")
    print(f"  {keys.signing_key} (0600): signs every reply and ledger record (Ed25519)")
    print(
        f"  {keys.enrolment}: public; send it to the coordinator for `fedllm pki enrol`. "
        f"Signing key id {enrolment['signing-key-id']}: read it out to them to compare."
    )
    for path, what in ((keys.ca, "--ca ca.pem"), (keys.coordinator_pub, "--coordinator-key")):
        if not path.is_file():
            print(f"  still needed from the coordinator: {path.name} (copy it here, or {what})")
    return 0


def cmd_site_app_hash(args: argparse.Namespace) -> int:
    # heavy: Flower's FAB builder loads only for this verb
    from fedllm.secure.app_pin import app_sha256

    digest = app_sha256(args.app)
    print(digest)
    print(
        f"# the FAB `flwr run {args.app}` builds; start the SuperNode with "
        f"`fedllm supernode ... --app-sha256 {digest}` to run only this app",
        file=sys.stderr,
    )
    return 0


def add_parsers(sub: Any) -> None:
    """`site init`, `site budget` and `site app-hash`."""
    site = verb_group(sub, "site", "a site's own keys and state")
    init = site.add_parser("init", help="make this site's node-auth and signing keys, here")
    init.add_argument("name", help="the site's name (letters, digits, '.', '_', '-')")
    init.add_argument("--out", help="the site's key folder (default keys/site/NAME)")
    init.add_argument("--ca", help="the federation's ca.pem, copied into the folder")
    init.add_argument("--coordinator-key", help="the coordinator.pub, copied into the folder")
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    init.set_defaults(func=cmd_site_init)
    budget = site.add_parser("budget", help="lifetime privacy spend per dataset, per run")
    budget.add_argument("--state-dir", required=True, help="the site's node config state-dir")
    budget.add_argument("--policy", help="the site's policy file (its epsilon-max is the cap)")
    budget.add_argument("--epsilon-max", type=float, default=0.0, help="the node's own cap")
    budget.add_argument("--at-rest-key", help="the key the site seals its ledgers with")
    budget.set_defaults(func=cmd_site_budget)
    pin = site.add_parser("app-hash", help="the SHA-256 of the app a site pins (--app-sha256)")
    pin.add_argument("app", nargs="?", default=".", help="the app directory it reviewed")
    pin.set_defaults(func=cmd_site_app_hash)
