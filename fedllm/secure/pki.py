"""The federation's certificates and the coordinator's keys, made with `cryptography`.

`fedllm pki init` makes what the coordinator holds:

- a CA (ECDSA P-384) that signs the SuperLink's TLS certificate, with a SAN for every host
  name or IP address the sites will dial;
- the coordinator's Ed25519 signing key (`superlink/coordinator.key`), which signs the
  registry and every instruction it sends; its public half (`coordinator.pub`) goes to
  every site and auditor;
- the registry (`registry.json`) of the sites' public keys, signed by that key; sites are
  added with `fedllm pki enrol FILE` from the enrolment file each site makes with
  `fedllm site init` (`fedllm.secure.site_keys`), so no site's private key is ever here.

`pki init --sites` also makes every site's keys in one place and enrols them: a demo for
one machine, where whoever ran it could sign as any site. Private keys are written 0600 and
never overwritten without `force`. Written by hand because Flower ships no certificate
tooling (its docs use an OpenSSL shell script); the primitives are `cryptography`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedllm.errors import KeyFileError
from fedllm.secure.keyfiles import check_private, write_new
from fedllm.secure.registry import (
    check_site_name,
    enrol,
    new_registry,
    signed_registry_bytes,
)
from fedllm.secure.site_keys import SiteKeys, init_site, pem_private, signing_pair

__all__ = [
    "PkiLayout",
    "check_certificate",
    "check_dates",
    "describe",
    "init_pki",
    "load_ca",
    "load_signing_key",
    "parse_sites",
]


@dataclass(frozen=True)
class PkiLayout:
    """Where each file of a ceremony lives under its root (default `keys/pki`).

    `superlink/` goes to the coordinator; `ca.pem` and `coordinator.pub` to every site;
    `ca.key` stays offline with whoever runs the ceremony. `sites/<name>/` exists only in
    the one-machine demo (`--sites`): a real site makes its own folder (`fedllm site init`).
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
    def coordinator_key(self) -> Path:
        return self.root / "superlink" / "coordinator.key"

    @property
    def coordinator_pub(self) -> Path:
        return self.root / "coordinator.pub"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def site(self, site: str) -> SiteKeys:
        """A demo site's folder (`--sites`), laid out as `fedllm site init` makes it."""
        return SiteKeys(self.site_dir(site))

    def node_auth_key(self, site: str) -> Path:
        return self.site(site).node_auth_key

    def node_auth_pub(self, site: str) -> Path:
        return self.site(site).node_auth_pub

    def signing_key(self, site: str) -> Path:
        return self.site(site).signing_key

    def signing_pub(self, site: str) -> Path:
        return self.site(site).signing_pub

    def site_ca(self, site: str) -> Path:
        return self.site(site).ca


def parse_sites(spec: str) -> list[str]:
    """`"3"` -> site-0..site-2; `"hospital-a,bank-b"` -> those names, in partition order."""
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise KeyFileError("--sites must name at least one site.")
        return [f"site-{k}" for k in range(int(spec))]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise KeyFileError(f"--sites {spec!r}: give a count or comma-separated names.")
    for name in names:
        check_site_name(name, where=f"--sites {spec!r}")
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


def init_pki(
    root: Path,
    *,
    hosts: list[str],
    sites: list[str] | tuple[str, ...] = (),
    days: int = 365,
    force: bool = False,
) -> dict[str, Any]:
    """Make the CA, the SuperLink's certificate, the coordinator's signing key and its
    signed registry; with `sites` (a one-machine demo) also make every site's keys under
    `sites/<name>/` and enrol them. Returns the registry.

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
        layout.coordinator_key,
        layout.coordinator_pub,
        layout.registry,
    ]
    for site in sites:
        keys = layout.site(site)
        targets += [keys.node_auth_key, keys.signing_key, keys.enrolment]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise KeyFileError(f"{existing[0]} exists; refusing to overwrite keys (use --force).")
    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write_new(layout.ca_key, pem_private(ca_key), 0o600, force=force)
    write_new(layout.ca_cert, ca_pem, 0o644, force=force)
    write_new(layout.server_key, pem_private(server_key), 0o600, force=force)
    write_new(
        layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644, force=force
    )
    coordinator, coordinator_private, coordinator_public = signing_pair()
    write_new(layout.coordinator_key, coordinator_private, 0o600, force=force)
    write_new(layout.coordinator_pub, coordinator_public, 0o644, force=force)
    ca_sha256 = hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    registry = new_registry(coordinator, ca_sha256)
    write_new(layout.registry, signed_registry_bytes(registry), 0o644, force=force)
    for partition, site in enumerate(sites):
        enrolment = init_site(
            layout.site_dir(site),
            site,
            ca=layout.ca_cert,
            coordinator_key=layout.coordinator_pub,
            force=force,
        )
        enrol(layout.registry, enrolment, coordinator, partition_id=partition)
    return json.loads(layout.registry.read_text())


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


def load_signing_key(
    path: Path, what: str = "a site's update-signing key"
) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 signing key (a site's, or the coordinator's); refused if others can read
    it or it is another kind."""
    data = check_private(Path(path), what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path} is not a PEM private key ({e}).") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__}, not an Ed25519 signing key.")
    return key


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
        if path.suffix == ".pem":  # a private key is never read: its mode says enough
            cert = x509.load_pem_x509_certificate(path.read_bytes())
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
            sites = sorted(json.loads(path.read_bytes())["sites"])
            row.update(kind="registry (signed by the coordinator)", sites=sites, status="ok")
        elif path.name == "enrolment.json":
            row.update(kind="a site's enrolment (public)", status="ok")
        else:
            secret = path.suffix == ".key"
            kind = {
                "node-auth": "node-auth key (P-384, OpenSSH)",
                "signing": "update-signing key (Ed25519)",
                "coordinator": "coordinator signing key (Ed25519)",
                "server": "SuperLink TLS key",
                "ca": "CA key (keep offline)",
            }.get(path.stem, "key")
            row.update(kind=("private " if secret else "public ") + kind)
            row["status"] = "TOO OPEN (chmod 600)" if secret and mode & 0o077 else "ok"
        rows.append(row)
    return rows
