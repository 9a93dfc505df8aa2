"""A site's two privacy ledgers: this run's, and its lifetime spend on this data.

The run's ledger (`<state-dir>/<run-name>/sites/site-<k>/ledger.jsonl`) is what the
coordinator's run ledger and `fedllm audit verify` are checked against, run by run. But the
run name comes from the coordinator, the party a site must not have to trust: a new name
would start an empty history, and a site's own ε cap would never trigger. So a site with a
`state-dir` also keeps a lifetime ledger (`<state-dir>/lifetime/<fingerprint>.jsonl`), keyed
by a fingerprint of its records (never by a string the coordinator sends), holding every
spend it ever made on them across runs; the site's own cap (its policy's `epsilon-max`, or
the node config's) is checked against that composed history before every round.

What this does not cover: records the coordinator chooses. A site partitioning the run's
`data.source` holds the records the coordinator's `data.*` keys select, and another
partition is other data with its own lifetime; a site's own `data` has one fingerprint.
Without a `state-dir` (a simulation) there is no lifetime ledger: the run directory is all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedllm.config import FedllmConfig
from fedllm.privacy.accounting import History
from fedllm.privacy.ledger import Ledger, record_signer
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import configured_key
from fedllm.site import PrivacyState

__all__ = ["LIFETIME_DIR", "SiteLedgers"]

LIFETIME_DIR = "lifetime"


@dataclass
class SiteLedgers:
    """The site's ledger of this run and, with a `state-dir`, its lifetime ledger."""

    run: Ledger
    lifetime: Ledger | None

    @classmethod
    def open(
        cls,
        cfg: FedllmConfig,
        node: Mapping[str, Any],
        *,
        site: int,
        fingerprint: str,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> SiteLedgers:
        """Both ledgers under the node config's (`node`) `state-dir` (else the run's under
        `run.output-dir`), sealed under the node's `at-rest-key`, else
        security.at-rest-key (a bad key stops the site before it trains); every record
        signed with the site's `signing_key` when given."""
        signer = record_signer(signing_key) if signing_key is not None else None
        root = node.get("state-dir")
        base = Path(str(root)) / cfg.run.name if root else Path(cfg.run.output_dir) / cfg.run.name
        key = configured_key(str(node.get("at-rest-key") or cfg.security.at_rest_key))
        lifetime = None
        if root:
            path = Path(str(root)) / LIFETIME_DIR / f"{fingerprint}.jsonl"
            lifetime = Ledger(path, key=key, signer=signer)
        run = Ledger(RunDir.site_ledger_path(base, site), key=key, signer=signer)
        return cls(run=run, lifetime=lifetime)

    def run_state(self) -> PrivacyState:
        """This run's DP-SGD history (what the run's ε and the coordinator's ledger count)."""
        return PrivacyState.from_ledger(self.run.records())

    def lifetime_history(self) -> History | None:
        """Every DP-SGD spend on these records, over every run; None without a `state-dir`."""
        return (
            None
            if self.lifetime is None
            else PrivacyState.from_ledger(self.lifetime.records()).history
        )

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write a round's spend durably to both, the lifetime ledger first: a crash between
        the two then over-counts the lifetime spend, never under-counts it. Returns the
        run ledger's stored (signed) record, which the reply carries to the coordinator."""
        if self.lifetime is not None:
            self.lifetime.append(record)
        return self.run.append(record)

    def append_once(self, record: dict[str, Any]) -> dict[str, Any]:
        """`append`, unless the run ledger already holds this very record (a replayed round,
        `fedllm.site_replay`): one spend, one record in each ledger."""
        return self.run.holding(record) or self.append(record)
