"""A site's own keys, made at the site (`fedllm site init NAME`).

The site's folder holds, after `site init` and once the coordinator's public files are
copied in:

- `node-auth.key` (0600) / `node-auth.pub`: ECDSA P-384 in OpenSSH format, what Flower's
  node authentication expects (`flower-supernode --auth-supernode-private-key`);
- `signing.key` (0600) / `signing.pub`: Ed25519, signs every reply and ledger record;
- `enrolment.json`: the public halves, self-signed, for `fedllm pki enrol` at the
  coordinator (nothing secret: mail it);
- `ca.pem` and `coordinator.pub`: the federation's CA certificate and the coordinator's
  public signing key, received out of band (`--ca`, `--coordinator-key`).

No private key is ever written outside this folder, and nothing here needs the coordinator.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedllm.errors import KeyFileError
from fedllm.secure.keyfiles import write_new
from fedllm.secure.registry import check_site_name, load_public_key, make_enrolment, public_pem

__all__ = ["SiteKeys", "init_site", "node_auth_pair", "pem_private", "signing_pair"]


@dataclass(frozen=True)
class SiteKeys:
    """Where each of a site's files lives in its folder."""

    root: Path

    @property
    def node_auth_key(self) -> Path:
        return self.root / "node-auth.key"

    @property
    def node_auth_pub(self) -> Path:
        return self.root / "node-auth.pub"

    @property
    def signing_key(self) -> Path:
        return self.root / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.root / "signing.pub"

    @property
    def enrolment(self) -> Path:
        return self.root / "enrolment.json"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def coordinator_pub(self) -> Path:
        return self.root / "coordinator.pub"


def pem_private(key: Any) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (written 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def node_auth_pair() -> tuple[bytes, bytes]:
    """OpenSSH-format P-384 pair, the format `flower-supernode` and `flwr supernode
    register` load."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def signing_pair() -> tuple[ed25519.Ed25519PrivateKey, bytes, bytes]:
    """A new Ed25519 key, its private PEM and its public PEM."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key, pem_private(key), public_pem(key)


def init_site(
    root: Path,
    name: str,
    *,
    ca: Path | None = None,
    coordinator_key: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Make a site's node-auth and signing keys in `root` and its enrolment file; copy in
    the federation's CA certificate and the coordinator's public key if given. Returns the
    enrolment. Nothing is written if a key exists and `force` is false."""
    check_site_name(name, where="fedllm site init")
    keys = SiteKeys(Path(root))
    targets = [keys.node_auth_key, keys.node_auth_pub, keys.signing_key, keys.signing_pub]
    existing = [p for p in [*targets, keys.enrolment] if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} exists; refusing to overwrite keys (use --force).")
    if coordinator_key is not None:
        load_public_key(coordinator_key)  # refused before any key is made
    node_private, node_public = node_auth_pair()
    key, sign_private, sign_public = signing_pair()
    write_new(keys.node_auth_key, node_private, 0o600, force=force)
    write_new(keys.node_auth_pub, node_public, 0o644, force=force)
    write_new(keys.signing_key, sign_private, 0o600, force=force)
    write_new(keys.signing_pub, sign_public, 0o644, force=force)
    enrolment = make_enrolment(name, key, node_public)
    write_new(keys.enrolment, json.dumps(enrolment, indent=2).encode(), 0o644, force=force)
    for source, target in ((ca, keys.ca), (coordinator_key, keys.coordinator_pub)):
        if source is not None and Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
    return enrolment
