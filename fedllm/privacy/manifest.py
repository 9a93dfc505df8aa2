"""The coordinator's signed manifest of a run: what an auditor checks the files against.

Written into the run directory (`manifest.json`) at every save, signed with the
coordinator's key: the run config's digest, the rounds completed, the SHA-256 of the last
checkpoint, and for the run's ledger and every site's ledger how many records it holds and
the hash of its last one (a site's, from the signed records its replies carried). A ledger
cut short, or re-chained, no longer matches what was signed; `fedllm audit verify` says
which. It proves what the coordinator held when it signed, not that its inputs were honest
(`fedllm.privacy.signed_ledgers` says what the sites' own signatures add).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fedllm.errors import KeyFileError
from fedllm.privacy.ledger import DP_SGD, GENESIS, SITE_RECORD
from fedllm.secure.registry import sign_body, verify_body

__all__ = [
    "MANIFEST_VERSION",
    "build_manifest",
    "load_manifest",
    "sign_manifest",
    "tree_sha256",
    "verify_manifest",
]

MANIFEST_VERSION = 1
_CONTEXT = b"fedllm manifest v1\n"


def tree_sha256(path: Path) -> str:
    """SHA-256 over every file under `path` (relative names and bytes, length-prefixed,
    in sorted order): a checkpoint's identity, whichever files it holds."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        for part in (str(file.relative_to(path)).encode(), file.read_bytes()):
            h.update(struct.pack(">Q", len(part)))
            h.update(part)
    return h.hexdigest()


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _heads(run_records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each site ledger's length and last hash, as the site's signed records in the run's
    ledger state them (the latest record each site sent)."""
    sites: dict[str, dict[str, Any]] = {}
    for record in run_records:
        inner = record.get(SITE_RECORD)
        if record.get("mechanism") != DP_SGD or not isinstance(inner, dict):
            continue
        seen = sites.get(str(record["site"]))
        if seen is None or int(inner["seq"]) > seen["records"]:
            sites[str(record["site"])] = {"records": int(inner["seq"]), "head": inner["sha256"]}
    return dict(sorted(sites.items()))


def build_manifest(
    *,
    run_name: str,
    rounds_completed: int,
    status: str,
    config_sha256: str,
    config_file: Path,
    run_records: list[dict[str, Any]],
    checkpoint: Path | None,
    registry_sha256: str,
) -> dict[str, Any]:
    """The manifest's body (unsigned) from what the run directory holds now."""
    return {
        "fedllm-manifest": MANIFEST_VERSION,
        "run": run_name,
        "rounds_completed": rounds_completed,
        "status": status,
        "run_config_sha256": config_sha256,
        "config_json_sha256": _file_sha256(config_file),
        "registry_sha256": registry_sha256,
        "checkpoint": (
            {"path": checkpoint.name, "sha256": tree_sha256(checkpoint)}
            if checkpoint is not None and checkpoint.is_dir()
            else None
        ),
        "ledgers": {
            "run": {
                "records": len(run_records),
                "head": run_records[-1]["sha256"] if run_records else GENESIS,
            },
            "sites": _heads(run_records),
        },
    }


def sign_manifest(body: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    sign_body(body, key, _CONTEXT)
    return body


def _ledger_problems(
    what: str, records: list[dict[str, Any]], signed: Mapping[str, Any]
) -> list[str]:
    count, head = int(signed["records"]), str(signed["head"])
    if len(records) < count:
        return [
            f"{what} holds {len(records)} records; the manifest signed {count} (cut short: "
            f"record {len(records) + 1} onwards is missing)"
        ]
    actual = records[count - 1]["sha256"] if count else GENESIS
    if actual != head:
        return [f"{what}: record {count} is not the one the manifest signed (re-chained?)"]
    if len(records) > count:
        return [
            f"{what} holds {len(records) - count} records after the last one the manifest signed"
        ]
    return []


def verify_manifest(
    body: dict[str, Any],
    coordinator: ed25519.Ed25519PublicKey,
    *,
    run_dir: Path,
    run_records: list[dict[str, Any]],
    site_records: Mapping[int, list[dict[str, Any]]],
) -> list[str]:
    """Where the run directory and the ledgers given differ from the signed manifest."""
    try:
        verify_body(body, coordinator, _CONTEXT, what="manifest.json")
    except KeyFileError as e:
        return [str(e).rstrip(".")]
    problems = _ledger_problems("the run's ledger", run_records, body["ledgers"]["run"])
    signed_sites = body["ledgers"]["sites"]
    for site, records in sorted(site_records.items()):
        signed = signed_sites.get(str(site))
        if signed is None:
            if records:
                problems.append(f"site {site}'s ledger: the manifest signed no record of it")
            continue
        problems += _ledger_problems(f"site {site}'s ledger", records, signed)
    config = _file_sha256(Path(run_dir) / "config.json")
    if config != body.get("config_json_sha256"):
        problems.append("config.json is not the one the manifest signed")
    checkpoint = body.get("checkpoint")
    if checkpoint is not None:
        path = Path(run_dir) / "checkpoints" / str(checkpoint["path"])
        if not path.is_dir():
            problems.append(f"the checkpoint the manifest signed ({path.name}) is missing")
        elif tree_sha256(path) != checkpoint["sha256"]:
            problems.append(f"checkpoint {path.name} is not the one the manifest signed")
    return problems


def load_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, or None if the run has none (signing was off)."""
    if not Path(path).is_file():
        return None
    body = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(body, dict) or body.get("fedllm-manifest") != MANIFEST_VERSION:
        raise KeyFileError(f"{path} is not a fedllm manifest (version {MANIFEST_VERSION}).")
    return body
