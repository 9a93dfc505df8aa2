"""The coordinator's registry of site keys, signed; and the enrolment file a site makes.

Keys are made where they are used. A site runs `fedllm site init NAME` (`fedllm.secure.
site_keys`): its node-auth and signing keys never leave it, and it hands the coordinator
a public enrolment file (its name and public keys, self-signed with its signing key, which
proves the site holds the private half). The coordinator adds it with `fedllm pki enrol
FILE`, which re-signs the whole registry with the coordinator's Ed25519 key
(`superlink/coordinator.key`). Sites, and auditors, check that signature against the
coordinator's public key they were given out of band (`coordinator.pub`), so a registry
that lists another key under a site's name is refused by the site it would impersonate.

What the signature proves: the registry is the one the holder of the coordinator's key
signed. It cannot prove the coordinator enrolled the right people; that is the enrolment
ceremony's (compare the key ids read out of band).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedllm.errors import KeyFileError
from fedllm.secure.keyfiles import write_new

__all__ = [
    "ENROLMENT_VERSION",
    "check_site_name",
    "REGISTRY_VERSION",
    "RegisteredSite",
    "Registry",
    "enrol",
    "load_enrolment",
    "load_public_key",
    "load_registry",
    "make_enrolment",
    "named_coordinator_key",
    "new_registry",
    "parse_registry",
    "public_key_id",
    "public_pem",
    "sign_body",
    "signed_registry_bytes",
    "verify_body",
]

REGISTRY_VERSION = 2
ENROLMENT_VERSION = 1
_REGISTRY_CONTEXT = b"fedllm registry v2\n"
_ENROLMENT_CONTEXT = b"fedllm enrolment v1\n"
SIGNATURE = "signature"


_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_site_name(name: str, *, where: str) -> str:
    """A site name is a path component (its key folder): letters, digits, '.', '_', '-'."""
    if not _SITE_NAME.match(name) or name in (".", ".."):
        raise KeyFileError(
            f"{where}: site name {name!r} is not a plain name (1-63 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit)."
        )
    return name


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def public_pem(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of an Ed25519 key (or of a private key's public half)."""
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_id(public_pem: bytes) -> str:
    """SHA-256 of the DER public key: what logs and summaries name a signing key by."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _ed25519_public(pem: bytes, what: str) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{what} is not a PEM public key ({e}).") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{what} is a {type(key).__name__}, not an Ed25519 public key.")
    return key


def load_public_key(path: str | Path, what: str = "the coordinator's public key") -> Any:
    """An Ed25519 public key file (`coordinator.pub`), refused in one line when it is not."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{what}: no file at {path}.")
    return _ed25519_public(path.read_bytes(), f"{path} ({what})")


def _canonical(body: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != SIGNATURE}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign_body(body: dict[str, Any], key: ed25519.Ed25519PrivateKey, context: bytes) -> None:
    """Sign `body` in place (its `signature` field: key id and Ed25519 over its JSON)."""
    body[SIGNATURE] = {
        "key-id": public_key_id(public_pem(key)),
        "ed25519": key.sign(context + _canonical(body)).hex(),
    }


def verify_body(
    body: dict[str, Any], key: ed25519.Ed25519PublicKey, context: bytes, *, what: str
) -> None:
    """Raise `KeyFileError` naming `what` unless `body`'s signature verifies under `key`."""
    sig = body.get(SIGNATURE)
    if not isinstance(sig, dict) or "ed25519" not in sig:
        raise KeyFileError(f"{what} is not signed (no signature field).")
    try:
        key.verify(bytes.fromhex(str(sig["ed25519"])), context + _canonical(body))
    except (InvalidSignature, ValueError):
        raise KeyFileError(
            f"{what}: its signature does not verify under key "
            f"{public_key_id(public_pem(key))[:16]}… (edited, or signed by another key)."
        ) from None


# -- enrolment: what a site hands the coordinator ------------------------------------------


def make_enrolment(
    name: str, signing_key: ed25519.Ed25519PrivateKey, node_auth_public: bytes
) -> dict[str, Any]:
    """A site's public enrolment, self-signed with the signing key it names."""
    pem = public_pem(signing_key)
    body: dict[str, Any] = {
        "fedllm-enrolment": ENROLMENT_VERSION,
        "name": name,
        "created": _now(),
        "signing-public-key": pem.decode(),
        "signing-key-id": public_key_id(pem),
        "node-auth-public-key": node_auth_public.decode().strip(),
    }
    sign_body(body, signing_key, _ENROLMENT_CONTEXT)
    return body


def load_enrolment(path: str | Path) -> dict[str, Any]:
    """A site's enrolment file, refused in one line when it is not one or its self-signature
    does not verify (a key the site does not hold)."""
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KeyFileError(f"enrolment file {path} cannot be read ({e.strerror or e}).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeyFileError(
            f"{path} is not an enrolment file (not JSON); make one at the site with "
            "`fedllm site init NAME`."
        ) from e
    if not isinstance(body, dict) or body.get("fedllm-enrolment") != ENROLMENT_VERSION:
        raise KeyFileError(
            f"{path} is not a fedllm enrolment file (no 'fedllm-enrolment': "
            f"{ENROLMENT_VERSION}); make one at the site with `fedllm site init NAME`."
        )
    missing = [k for k in ("name", "signing-public-key", "node-auth-public-key") if k not in body]
    if missing:
        raise KeyFileError(f"enrolment file {path} lacks {', '.join(missing)}.")
    check_site_name(str(body["name"]), where=str(path))
    key = _ed25519_public(str(body["signing-public-key"]).encode(), f"{path}: signing key")
    verify_body(body, key, _ENROLMENT_CONTEXT, what=f"enrolment file {path}")
    if not str(body["node-auth-public-key"]).startswith("ecdsa-sha2-nistp384 "):
        raise KeyFileError(
            f"enrolment file {path}: node-auth-public-key is not an OpenSSH P-384 key."
        )
    return body


# -- the registry ----------------------------------------------------------------------------


def new_registry(coordinator_key: ed25519.Ed25519PrivateKey, ca_sha256: str) -> dict[str, Any]:
    """An empty, signed registry for the coordinator whose key this is."""
    pem = public_pem(coordinator_key)
    body: dict[str, Any] = {
        "version": REGISTRY_VERSION,
        "created": _now(),
        "ca_sha256": ca_sha256,
        "coordinator": {"signing-public-key": pem.decode(), "key-id": public_key_id(pem)},
        "sites": {},
    }
    sign_body(body, coordinator_key, _REGISTRY_CONTEXT)
    return body


def enrol(
    registry_path: Path,
    enrolment: dict[str, Any],
    coordinator_key: ed25519.Ed25519PrivateKey,
    *,
    partition_id: int | None = None,
) -> dict[str, Any]:
    """Add a site's enrolment to the registry (next free partition id unless given) and
    re-sign it; refuses a name, a key or a partition id already registered."""
    body = _read(Path(registry_path))
    verify_body(
        body, coordinator_key.public_key(), _REGISTRY_CONTEXT, what=f"registry {registry_path}"
    )
    sites: dict[str, Any] = body["sites"]
    name = str(enrolment["name"])
    if name in sites:
        raise KeyFileError(f"{registry_path} already registers a site named {name!r}.")
    key_id = public_key_id(str(enrolment["signing-public-key"]).encode())
    for other, entry in sites.items():
        if entry["signing-key-id"] == key_id:
            raise KeyFileError(f"{registry_path}: {other!r} already holds this signing key.")
    taken = {int(e["partition-id"]) for e in sites.values()}
    if partition_id is None:
        partition_id = next(k for k in range(len(taken) + 1) if k not in taken)
    if partition_id < 0 or partition_id in taken:
        raise KeyFileError(f"{registry_path}: partition-id {partition_id} is taken or negative.")
    sites[name] = {
        "partition-id": partition_id,
        "signing-public-key": str(enrolment["signing-public-key"]),
        "signing-key-id": key_id,
        "node-auth-public-key": str(enrolment["node-auth-public-key"]),
        "enrolled": _now(),
    }
    sign_body(body, coordinator_key, _REGISTRY_CONTEXT)
    write_new(Path(registry_path), json.dumps(body, indent=2).encode(), 0o644, force=True)
    return sites[name]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KeyFileError(
            f"no signing-key registry at {path} (security.registry); make one with "
            "`fedllm pki init` and add sites with `fedllm pki enrol`."
        )
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path} is not a valid fedllm signing-key registry: {e}.") from e
    if not isinstance(body, dict) or body.get("version") != REGISTRY_VERSION:
        version = body.get("version") if isinstance(body, dict) else None
        raise KeyFileError(
            f"{path} is not a fedllm signing-key registry of version {REGISTRY_VERSION} "
            f"(version {version!r}; version 1 registries were unsigned: make a new one with "
            "`fedllm pki init`)."
        )
    return body


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    partition_id: int
    public_key: ed25519.Ed25519PublicKey
    key_id: str


@dataclass(frozen=True)
class Registry:
    """A registry whose signature verified: its sites by partition id, its exact bytes (what
    instructions carry to the sites) and the coordinator key that signed it."""

    sites: dict[int, RegisteredSite]
    raw: bytes
    coordinator_key_id: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def parse_registry(
    raw: bytes, coordinator: ed25519.Ed25519PublicKey, *, what: str, allow_empty: bool = False
) -> Registry:
    """Verify a registry's bytes under the coordinator's key and read its sites."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{what} is not a valid fedllm signing-key registry: {e}.") from e
    if not isinstance(body, dict) or body.get("version") != REGISTRY_VERSION:
        raise KeyFileError(f"{what} is not a fedllm signing-key registry of version 2.")
    verify_body(body, coordinator, _REGISTRY_CONTEXT, what=what)
    try:
        sites: dict[int, RegisteredSite] = {}
        for name, entry in body["sites"].items():
            pem = entry["signing-public-key"].encode()
            key = _ed25519_public(pem, f"{what}: site {name!r}'s signing key")
            pid = int(entry["partition-id"])
            if pid in sites:
                raise ValueError(f"partition-id {pid} given to two sites")
            sites[pid] = RegisteredSite(name, pid, key, public_key_id(pem))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KeyFileError(f"{what} is not a valid fedllm signing-key registry: {e}.") from e
    if not sites and not allow_empty:
        raise KeyFileError(f"{what} registers no sites; add them with `fedllm pki enrol`.")
    return Registry(sites, raw, public_key_id(public_pem(coordinator)))


def load_registry(path: str | Path, coordinator: ed25519.Ed25519PublicKey) -> Registry:
    """The registry file at `path`, its signature checked under the coordinator's key."""
    path = Path(path)
    _read(path)  # one-line refusals for a missing file or an old, unsigned version
    return parse_registry(path.read_bytes(), coordinator, what=f"registry {path}")


def named_coordinator_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """The coordinator key a registry names itself: only as good as the registry file (an
    auditor checks against the copy of `coordinator.pub` it was given, when it has one)."""
    body = _read(Path(path))
    try:
        pem = str(body["coordinator"]["signing-public-key"]).encode()
    except (KeyError, TypeError) as e:
        raise KeyFileError(f"registry {path} names no coordinator key ({e}).") from e
    return _ed25519_public(pem, f"registry {path}: the coordinator's key")


def signed_registry_bytes(body: dict[str, Any]) -> bytes:
    """How a registry body is stored."""
    return json.dumps(body, indent=2).encode()
