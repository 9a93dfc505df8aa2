"""Checks a SuperLink or a site runs before any training: certificates, key files, address.

Flower reports a bad certificate or an unreachable SuperLink as exit code 305 after its
retries, and a world-readable key not at all. These checks name the file or address and say
what to do, and `fedllm superlink` / `fedllm supernode` run them before they start Flower.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedllm.errors import KeyFileError, TransportError
from fedllm.secure.keyfiles import check_private
from fedllm.secure.pki import (
    PkiLayout,
    check_certificate,
    check_dates,
    load_ca,
    load_signing_key,
)
from fedllm.secure.registry import load_public_key, load_registry

__all__ = ["Checked", "check_site", "check_superlink", "parse_address", "probe_tls"]


@dataclass
class Checked:
    """What passed, one line each, for the user to read before Flower starts."""

    lines: list[str] = field(default_factory=list)

    def ok(self, line: str) -> None:
        self.lines.append(line)


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`, refused with the address named when malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TransportError(
            f"SuperLink address {address!r} is not host:port (e.g. 10.0.0.5:9092)."
        )
    return host, int(port)


def probe_tls(address: str, ca_path: Path, *, timeout: float = 5.0) -> str:
    """Dial `address`, and complete a TLS handshake trusting only the federation's CA and
    checking the host name, as a SuperNode will. Returns the negotiated TLS version."""
    host, port = parse_address(address)
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return str(tls.version())
    except ssl.SSLCertVerificationError as e:
        why = e.verify_message or str(e)
        raise TransportError(
            f"the SuperLink at {address} presented a certificate this site rejects ({why}); "
            f"check that {ca_path} is the CA from the same `fedllm pki init`, that the "
            f"certificate names {host!r} (--hosts), and that it has not expired."
        ) from e
    except ssl.SSLError as e:
        raise TransportError(
            f"TLS handshake with {address} failed ({e.reason or e}); is the SuperLink running "
            "with --ssl-certfile/--ssl-keyfile (not --insecure)?"
        ) from e
    except TimeoutError as e:
        raise TransportError(
            f"the SuperLink at {address} does not answer (no reply within {timeout:g}s); check "
            "the address, that flower-superlink is running, and that the port is open."
        ) from e
    except OSError as e:
        raise TransportError(
            f"the SuperLink at {address} does not answer ({e.strerror or e}); check the "
            "address, that flower-superlink is running, and that the port is open."
        ) from e


def _check_node_auth_key(path: Path) -> None:
    data = check_private(path, "a SuperNode's node-authentication key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(
            f"{path} is not an OpenSSH private key ({e}); use node-auth.key from `fedllm pki init`."
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(
            f"{path} is a {type(key).__name__}; Flower's node authentication needs an EC "
            "(P-384) key."
        )


def check_site(
    site_dir: Path, superlink: str | None, *, sign_updates: bool = True, timeout: float = 5.0
) -> Checked:
    """A site's files (CA, node-auth key, signing key) and, with `superlink`, the address."""
    site_dir = Path(site_dir)
    done = Checked()
    ca = site_dir / "ca.pem"
    cert = load_ca(ca)
    check_dates(ca, cert)
    done.ok(f"CA {ca}: valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    _check_node_auth_key(site_dir / "node-auth.key")
    done.ok(f"node-auth key {site_dir / 'node-auth.key'}: P-384, mode 600")
    if sign_updates:
        load_signing_key(site_dir / "signing.key")
        done.ok(f"signing key {site_dir / 'signing.key'}: Ed25519, mode 600")
        coordinator = site_dir / "coordinator.pub"
        load_public_key(coordinator)
        done.ok(f"coordinator's key {coordinator}: Ed25519 (instructions are checked against it)")
    if superlink is not None:
        version = probe_tls(superlink, ca, timeout=timeout)
        done.ok(f"SuperLink {superlink}: answers, {version}, certificate issued by this CA")
    return done


def check_superlink(root: Path, hosts: list[str] | None = None) -> Checked:
    """The coordinator's certificate (dates, issuer, host names), its key, the registry."""
    layout = PkiLayout(Path(root))
    done = Checked()
    for host in hosts or [None]:
        cert = check_certificate(layout.server_cert, layout.ca_cert, host=host)
    done.ok(
        f"TLS certificate {layout.server_cert}: issued by {layout.ca_cert}, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d}" + (f", names {', '.join(hosts)}" if hosts else "")
    )
    data = check_private(layout.server_key, "the SuperLink's TLS private key")
    key = serialization.load_pem_private_key(data, password=None)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise KeyFileError(
            f"{layout.server_key} does not belong to {layout.server_cert}; use the pair from "
            "the same `fedllm pki init`."
        )
    done.ok(f"TLS key {layout.server_key}: matches the certificate, mode 600")
    coordinator = load_signing_key(layout.coordinator_key, "the coordinator's signing key")
    done.ok(f"coordinator's signing key {layout.coordinator_key}: Ed25519, mode 600")
    registry = load_registry(layout.registry, coordinator.public_key())
    done.ok(
        f"registry {layout.registry}: {len(registry.sites)} sites, signed by the coordinator's key"
    )
    return done
