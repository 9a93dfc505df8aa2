"""Ledgers checked against keys, not against whoever holds them.

A ledger's hash chain proves only that its records were not edited one at a time: anyone
can rewrite a whole ledger and re-hash it. Two signatures close that gap:

- each site signs every record it writes (`site_signature`, `fedllm.privacy.ledger`), and
  the run's ledger carries the site's signed record of each spend (`site_record`): an
  edited ε, a re-chained ledger or a record signed by another site's key fails under the
  registry's key for that site;
- the coordinator signs a manifest of the run (`fedllm.privacy.manifest`): how many records
  each ledger holds and the hash of its last one, so a ledger cut short fails too.

What this cannot catch: a site that lies in what it signs (it states its own noise; the
canary audit, `fedllm audit canaries`, is the check on that), and a coordinator that signs a
manifest of a run ledger it rewrote from records it was sent (only the sites' signatures in
it are beyond its reach).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedllm.errors import InvalidUpdateError
from fedllm.privacy.ledger import DP_SGD, SITE_RECORD, SITE_SIGNATURE, record_hash, signed_body
from fedllm.secure.registry import RegisteredSite

__all__ = ["check_same_spend", "record_signature_problem", "verify_signed_ledgers"]

# What a site's record and the run's record of the same spend must agree on.
_SPEND_FIELDS = ("round", "site", "mechanism", "noise_multiplier", "sample_rate", "steps", "delta")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def _differs(site_record: Mapping[str, Any], entry: Mapping[str, Any]) -> list[str]:
    fields = [k for k in _SPEND_FIELDS if not _same(site_record.get(k), entry.get(k))]
    if not _same(site_record.get("guarantee"), entry.get("guarantee")):
        fields.append("guarantee")
    return fields


def check_same_spend(
    site_record: Mapping[str, Any], entry: Mapping[str, Any], *, sender: str
) -> None:
    """Refuse a reply whose signed ledger record states another spend than its metrics."""
    fields = _differs(site_record, entry)
    if fields:
        raise InvalidUpdateError(
            f"{sender}: its signed ledger record disagrees with the spend it reports "
            f"({', '.join(fields)})."
        )


def record_signature_problem(record: Mapping[str, Any], site: RegisteredSite) -> str | None:
    """Why `record` is not a record `site` signed (unsigned, another key, edited after
    signing, its sha256 not its content), or None when it is."""
    sig = record.get(SITE_SIGNATURE)
    if not isinstance(sig, Mapping) or "ed25519" not in sig:
        return f"not signed by site {site.name!r}"
    key_id = str(sig.get("key-id", ""))
    if key_id != site.key_id:
        return (
            f"signed by key {key_id[:16]}…, not by site {site.name!r}'s registered key "
            f"{site.key_id[:16]}…"
        )
    try:
        site.public_key.verify(bytes.fromhex(str(sig["ed25519"])), signed_body(dict(record)))
    except (InvalidSignature, ValueError):
        return f"site {site.name!r}'s signature does not verify (edited after signing)"
    if record.get("sha256") != record_hash(dict(record)):
        return "its sha256 does not match its content"
    return None


def verify_signed_ledgers(
    run_records: list[dict[str, Any]],
    site_records: Mapping[int, list[dict[str, Any]]],
    registry: Mapping[int, RegisteredSite],
) -> list[str]:
    """Every record a site wrote checked against its registered key, in its own ledger and
    as the run's ledger carries it. A run-ledger spend without the site's record is a
    problem unless it says it was backfilled (rebuilt from a later reply's history: it can
    only add spend, never hide it)."""
    problems = []
    for index, record in enumerate(run_records, start=1):
        if record.get("mechanism") != DP_SGD:
            continue
        label = (
            f"run ledger record {index} (site {record.get('site')}, round {record.get('round')})"
        )
        site = registry.get(_int(record.get("site")))
        if site is None:
            problems.append(f"{label}: site {record.get('site')} is not in the registry")
            continue
        inner = record.get(SITE_RECORD)
        if inner is None:
            if "backfilled" not in record:
                problems.append(f"{label}: carries no record signed by the site")
            continue
        why = record_signature_problem(inner, site)
        if why is not None:
            problems.append(f"{label}: the site's record is {why}")
        elif fields := _differs(inner, record):
            problems.append(f"{label}: differs from the site's signed record ({', '.join(fields)})")
    for site_id, records in sorted(site_records.items()):
        site = registry.get(site_id)
        if site is None:
            problems.append(f"site {site_id}'s ledger: site {site_id} is not in the registry")
            continue
        for index, record in enumerate(records, start=1):
            why = record_signature_problem(record, site)
            if why is not None:
                problems.append(f"site {site_id}'s ledger, record {index}: {why}")
    return problems


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
