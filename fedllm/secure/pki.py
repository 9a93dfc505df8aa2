"""The federation's keys and certificates, made with `cryptography`.

One ceremony (`fedllm pki init`) makes everything a multi-site deployment needs:

- a CA (ECDSA P-384) that signs the SuperLink's TLS certificate, with a SAN for every host
  name or IP address the sites will dial;
- per site, the node-authentication key pair Flower's `--enable-supernode-auth` expects
  (ECDSA P-384 in OpenSSH format: `flwr supernode register <site>/node-auth.pub`,
  `flower-supernode --auth-supernode-private-key <site>/node-auth.key`);
- per site, an Ed25519 key that signs every update it sends (`fedllm.secure.sign`), and a
  registry (`registry.json`) of the public halves the coordinator checks them against.

Private keys are written 0600 and never overwritten without `force`. Written by hand because
Flower ships no certificate tooling (its docs use an OpenSSL shell script); the primitives
are `cryptography`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedllm.errors import KeyFileError
from fedllm.secure.keyfiles import check_private, write_new

__all__ = [
    "PkiLayout",
    "check_certificate",
    "check_dates",
    "describe",
    "init_pki",
    "load_ca",
    "load_registry",
    "load_signing_key",
    "parse_sites",
]

REGISTRY_VERSION = 1
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class PkiLayout:
    """Where each file of a ceremony lives under its root (default `keys/pki`).

    `superlink/` goes to the coordinator; `sites/<name>/` (with `ca.pem`) to that site
    only; `ca.key` stays offline with whoever runs the ceremony.
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def node_auth_key(self, site: str) -> Path:
        return self.site_dir(site) / "node-auth.key"

    def node_auth_pub(self, site: str) -> Path:
        return self.site_dir(site) / "node-auth.pub"

    def signing_key(self, site: str) -> Path:
        return self.site_dir(site) / "signing.key"

    def signing_pub(self, site: str) -> Path:
        return self.site_dir(site) / "signing.pub"

    def site_ca(self, site: str) -> Path:
        return self.site_dir(site) / "ca.pem"


def parse_sites(spec: str) -> list[str]:
    """`"3"` -> site-0..site-2; `"hospital-a,bank-b"` -> those names, in partition order."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise KeyFileError("--sites must name at least one site.")
        return [f"site-{k}" for k in range(int(spec))]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if not _SITE_NAME.match(n)]
    if not names or bad:
        raise KeyFileError(
            f"--sites {spec!r}: give a count or comma-separated names of letters, digits, "
            f"'.', '_' or '-'{f' (not {bad[0]!r})' if bad else ''}."
        )
    if len(set(names)) != len(names):
        raise KeyFileError(f"--sites {spec!r} names a site twice.")
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(
    days: int, *, common_name: str = "fedllm federation CA"
) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: Any, ca_cert: x509.Certificate, hosts: list[str], days: int
) -> tuple[Any, x509.Certificate]:
    """The SuperLink's TLS certificate: a SAN per host name or IP the sites will dial."""
    if not hosts:
        raise KeyFileError("--hosts must name at least one host name or IP address.")
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _node_auth_pair() -> tuple[bytes, bytes]:
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


def _signing_pair() -> tuple[bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _pem_private(key), public


def public_key_id(public_pem: bytes) -> str:
    """SHA-256 of the DER public key: what logs and summaries name a signing key by."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def init_pki(
    root: Path, *, hosts: list[str], sites: list[str], days: int = 365, force: bool = False
) -> dict[str, Any]:
    """Make the CA, the SuperLink's certificate, and every site's two key pairs.

    Nothing is written if any target exists and `force` is false, so a half-made ceremony
    never mixes with an old one.
    """
    layout = PkiLayout(Path(root))
    if days < 1:
        raise KeyFileError("--days must be at least 1.")
    targets = [
        layout.ca_cert,
        layout.ca_key,
        layout.server_cert,
        layout.server_key,
        layout.registry,
    ]
    for site in sites:
        targets += [
            layout.node_auth_key(site),
            layout.node_auth_pub(site),
            layout.signing_key(site),
            layout.signing_pub(site),
            layout.site_ca(site),
        ]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} exists; refusing to overwrite keys (use --force).")
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_new(layout.ca_key, _pem_private(ca_key), 0o600, force=force)
    write_new(layout.ca_cert, ca_pem, 0o644, force=force)
    write_new(layout.server_key, _pem_private(server_key), 0o600, force=force)
    write_new(
        layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644, force=force
    )
    registry: dict[str, Any] = {
        "version": REGISTRY_VERSION,
        "created": _now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ca_sha256": hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        "sites": {},
    }
    for partition, site in enumerate(sites):
        node_private, node_public = _node_auth_pair()
        sign_private, sign_public = _signing_pair()
        write_new(layout.node_auth_key(site), node_private, 0o600, force=force)
        write_new(layout.node_auth_pub(site), node_public, 0o644, force=force)
        write_new(layout.signing_key(site), sign_private, 0o600, force=force)
        write_new(layout.signing_pub(site), sign_public, 0o644, force=force)
        write_new(layout.site_ca(site), ca_pem, 0o644, force=force)
        registry["sites"][site] = {
            "partition-id": partition,
            "signing-public-key": sign_public.decode(),
            "signing-key-id": public_key_id(sign_public),
            "node-auth-public-key": node_public.decode().strip(),
        }
    write_new(layout.registry, json.dumps(registry, indent=2).encode(), 0o644, force=force)
    return registry


# -- loading and checking -------------------------------------------------------------------


def _load_cert(path: Path, what: str) -> x509.Certificate:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{what}: no file at {path} (make one with `fedllm pki init`).")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as e:
        raise KeyFileError(f"{path} ({what}) is not a PEM certificate ({e}).") from e


def load_ca(path: Path) -> x509.Certificate:
    cert = _load_cert(path, "the federation's CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise KeyFileError(f"{path} is not a CA certificate (no CA basic constraint).")
    return cert


def check_dates(path: Path, cert: x509.Certificate, *, now: dt.datetime | None = None) -> None:
    """Refuse a certificate outside its validity period, naming the file and the date."""
    now = now or _now()
    if now < cert.not_valid_before_utc:
        raise KeyFileError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)."
        )
    if now > cert.not_valid_after_utc:
        raise KeyFileError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; make new certificates "
            "with `fedllm pki init --force` (or renew this one from the same CA)."
        )


def check_certificate(
    cert_path: Path,
    ca_path: Path,
    *,
    host: str | None = None,
    now: dt.datetime | None = None,
    warn_days: int = 0,
) -> x509.Certificate:
    """Refuse a certificate that has expired, is not yet valid, was not issued by the CA,
    or (with `host`) does not name the host it will be reached at."""
    ca = load_ca(ca_path)
    check_dates(ca_path, ca, now=now)
    cert = _load_cert(cert_path, "a TLS certificate")
    check_dates(cert_path, cert, now=now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"{cert_path} was not issued by the CA in {ca_path} ({e}); the sites would refuse "
            "the connection. Use the ca.pem from the same `fedllm pki init`."
        ) from e
    except Exception as e:  # InvalidSignature carries no message
        raise KeyFileError(
            f"{cert_path} was not issued by the CA in {ca_path} (signature does not verify); "
            "use the ca.pem from the same `fedllm pki init`."
        ) from e
    if host is not None:
        names = _san_names(cert)
        if host not in names:
            raise KeyFileError(
                f"{cert_path} is not valid for {host!r} (it names {', '.join(names) or 'no host'}"
                f"); remake it with `fedllm pki init --hosts {host},...`."
            )
    return cert


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """A site's Ed25519 signing key; refused if others can read it or it is another kind."""
    data = check_private(Path(path), "a site's update-signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not a PEM private key ({e}).") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}, not an Ed25519 signing key.")
    return key


@dataclass(frozen=True)
class RegisteredSite:
    name: str
    partition_id: int
    public_key: ed25519.Ed25519PublicKey
    key_id: str


def load_registry(path: Path) -> dict[int, RegisteredSite]:
    """The coordinator's registry of site signing keys, by partition id."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"no signing-key registry at {path} (security.registry); make one with "
            "`fedllm pki init`."
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != REGISTRY_VERSION:
            raise ValueError(f"version {raw.get('version')!r}, expected {REGISTRY_VERSION}")
        sites: dict[int, RegisteredSite] = {}
        for name, entry in raw["sites"].items():
            pem = entry["signing-public-key"].encode()
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise ValueError(f"site {name!r}: not an Ed25519 public key")
            pid = int(entry["partition-id"])
            if pid in sites:
                raise ValueError(f"partition-id {pid} given to two sites")
            sites[pid] = RegisteredSite(name, pid, key, public_key_id(pem))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KeyFileError(f"{path} is not a valid fedllm signing-key registry: {e}.") from e
    if not sites:
        raise KeyFileError(f"{path} registers no sites.")
    return sites


def describe(root: Path, *, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """What a ceremony left under `root`: one row per file (kind, subject, expiry, mode)."""
    now = now or _now()
    rows: list[dict[str, Any]] = []
    root = Path(root)
    if not root.is_dir():
        raise KeyFileError(f"no keys under {root}; make them with `fedllm pki init`.")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        mode = path.stat().st_mode & 0o777
        row: dict[str, Any] = {"file": str(path.relative_to(root)), "mode": f"{mode:o}"}
        data = path.read_bytes()
        if path.suffix == ".pem":
            cert = x509.load_pem_x509_certificate(data)
            left = cert.not_valid_after_utc - now
            row.update(
                kind="certificate",
                subject=cert.subject.rfc4514_string(),
                hosts=_san_names(cert),
                expires=f"{cert.not_valid_after_utc:%Y-%m-%d}",
                days_left=left.days,
                status="EXPIRED" if left.total_seconds() < 0 else "ok",
            )
        elif path.name == "registry.json":
            row.update(kind="registry", sites=sorted(json.loads(data)["sites"]), status="ok")
        else:
            secret = path.suffix == ".key"
            kind = {
                "node-auth": "node-auth key (P-384, OpenSSH)",
                "signing": "update-signing key (Ed25519)",
                "server": "SuperLink TLS key",
                "ca": "CA key (keep offline)",
            }.get(path.stem, "key")
            row.update(kind=("private " if secret else "public ") + kind)
            row["status"] = "TOO OPEN (chmod 600)" if secret and mode & 0o077 else "ok"
        rows.append(row)
    return rows
