"""`fedllm pki`: the ceremony's files, what Flower accepts, and the checks run before Flower.

The TLS checks dial a real TLS server on loopback (Python's `ssl`, serving the SuperLink
certificate the ceremony made), so a refused certificate is refused by a real handshake.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedllm.cli import main as cli
from fedllm.errors import KeyFileError, TransportError
from fedllm.secure.pki import (
    PkiLayout,
    check_certificate,
    describe,
    init_pki,
    load_signing_key,
    parse_sites,
)
from fedllm.secure.preflight import check_site, check_superlink, parse_address, probe_tls
from fedllm.secure.registry import load_registry, sign_body
from tests.deployment import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, hosts=["localhost", "127.0.0.1"], sites=["site-0", "site-1"], days=30)
    return PkiLayout(root)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    """A second, unrelated ceremony: its CA and keys must be refused by the first."""
    root = tmp_path_factory.mktemp("other")
    init_pki(root, hosts=["superlink.example"], sites=["site-0"])
    return PkiLayout(root)


def _serve_tls(layout: PkiLayout) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting `layout`'s SuperLink certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(layout.server_cert, layout.server_key)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def tls_port(pki: PkiLayout) -> Iterator[int]:
    yield from _serve_tls(pki)


@pytest.fixture(scope="module")
def foreign_tls_port(other: PkiLayout) -> Iterator[int]:
    yield from _serve_tls(other)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the ceremony --------------------------------------------------------------------------


def test_private_keys_are_0600_and_public_files_are_readable(pki: PkiLayout) -> None:
    for secret in (
        pki.ca_key,
        pki.server_key,
        pki.node_auth_key("site-0"),
        pki.signing_key("site-1"),
    ):
        assert _mode(secret) == 0o600
    for public in (pki.ca_cert, pki.server_cert, pki.registry, pki.signing_pub("site-0")):
        assert _mode(public) == 0o644


def test_the_superlink_certificate_names_every_host_and_chains_to_the_ca(pki: PkiLayout) -> None:
    cert = check_certificate(pki.server_cert, pki.ca_cert, host="127.0.0.1")
    check_certificate(pki.server_cert, pki.ca_cert, host="localhost")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in san} == {"localhost", "127.0.0.1"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_node_auth_keys_are_what_flowers_own_loaders_accept(pki: PkiLayout) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(pki.node_auth_pub("site-0"))  # `flwr supernode register`
    key = load_ssh_private_key(pki.node_auth_key("site-0").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"  # what flower-supernode --auth-... loads


def _coordinator(pki: PkiLayout):  # noqa: ANN202 - an Ed25519 public key
    return load_signing_key(pki.coordinator_key).public_key()


def test_the_registry_holds_each_sites_signing_key_by_partition(pki: PkiLayout) -> None:
    sites = load_registry(pki.registry, _coordinator(pki)).sites
    assert [sites[k].name for k in sorted(sites)] == ["site-0", "site-1"]
    message = b"round 1"
    signature = load_signing_key(pki.signing_key("site-1")).sign(message)
    sites[1].public_key.verify(signature, message)


def test_existing_keys_are_never_overwritten_without_force(tmp_path: Path) -> None:
    init_pki(tmp_path, hosts=["localhost"], sites=["a"])
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite keys"):
        init_pki(tmp_path, hosts=["localhost"], sites=["a"])
    assert (tmp_path / "ca.key").read_bytes() == before
    init_pki(tmp_path, hosts=["localhost"], sites=["a"], force=True)
    assert (tmp_path / "ca.key").read_bytes() != before


@pytest.mark.parametrize(
    ("spec", "names"),
    [("3", ["site-0", "site-1", "site-2"]), ("hospital-a, bank.b", ["hospital-a", "bank.b"])],
)
def test_sites_are_a_count_or_names(spec: str, names: list[str]) -> None:
    assert parse_sites(spec) == names


@pytest.mark.parametrize(
    ("spec", "why"), [("0", "at least one"), ("a,a", "twice"), ("../x", "not")]
)
def test_bad_site_lists_are_refused(spec: str, why: str) -> None:
    with pytest.raises(KeyFileError, match=why):
        parse_sites(spec)


# -- checks before Flower starts -----------------------------------------------------------


def test_an_expired_certificate_is_named_with_its_date(pki: PkiLayout) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    with pytest.raises(KeyFileError, match=r"expired on .*`fedllm pki init --force`"):
        check_certificate(pki.server_cert, pki.ca_cert, now=later)
    rows = {r["file"]: r for r in describe(pki.root, now=later)}
    assert rows["superlink/server.pem"]["status"] == "EXPIRED"


def test_a_certificate_from_another_ca_is_refused(pki: PkiLayout, other: PkiLayout) -> None:
    with pytest.raises(KeyFileError, match="was not issued by the CA"):
        check_certificate(other.server_cert, pki.ca_cert)


def test_a_certificate_that_does_not_name_the_host_is_refused(pki: PkiLayout) -> None:
    with pytest.raises(KeyFileError, match=r"not valid for 'superlink.example'.*--hosts"):
        check_certificate(pki.server_cert, pki.ca_cert, host="superlink.example")


def test_a_key_file_others_can_read_is_refused_before_anything_starts(tmp_path: Path) -> None:
    init_pki(tmp_path, hosts=["localhost"], sites=["s"])
    layout = PkiLayout(tmp_path)
    for path in (layout.signing_key("s"), layout.node_auth_key("s"), layout.server_key):
        os.chmod(path, 0o644)
        with pytest.raises(KeyFileError, match=rf"{path}.*readable by others.*chmod 600"):
            if path == layout.server_key:
                check_superlink(tmp_path)
            else:
                check_site(layout.site_dir("s"), None)
        os.chmod(path, 0o600)
    assert {r["status"] for r in describe(tmp_path)} == {"ok"}


def test_a_tls_key_that_does_not_match_its_certificate_is_refused(
    tmp_path: Path, other: PkiLayout
) -> None:
    init_pki(tmp_path, hosts=["localhost"], sites=["s"])
    PkiLayout(tmp_path).server_key.write_bytes(other.server_key.read_bytes())
    with pytest.raises(KeyFileError, match="does not belong to"):
        check_superlink(tmp_path)


def test_an_edited_registry_fails_the_coordinators_signature(
    tmp_path: Path, pki: PkiLayout
) -> None:
    bad = tmp_path / "registry.json"
    raw = json.loads(pki.registry.read_text())
    raw["sites"]["site-1"]["signing-public-key"] = raw["sites"]["site-0"]["signing-public-key"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(KeyFileError, match=rf"registry {bad}: its signature does not verify"):
        load_registry(bad, _coordinator(pki))


def test_a_signed_but_corrupt_registry_is_refused_naming_the_file(
    tmp_path: Path, pki: PkiLayout
) -> None:
    bad = tmp_path / "registry.json"
    raw = json.loads(pki.registry.read_text())
    raw["sites"]["site-1"]["partition-id"] = 0
    sign_body(raw, load_signing_key(pki.coordinator_key), b"fedllm registry v2\n")
    bad.write_text(json.dumps(raw))
    with pytest.raises(KeyFileError, match=rf"{bad} is not a valid .*partition-id 0 given to two"):
        load_registry(bad, _coordinator(pki))


def test_a_registry_is_refused_under_another_coordinators_key(
    pki: PkiLayout, other: PkiLayout
) -> None:
    with pytest.raises(KeyFileError, match="signature does not verify under key"):
        load_registry(pki.registry, _coordinator(other))


def test_a_site_completes_a_real_tls_handshake_with_the_federations_ca(
    pki: PkiLayout, tls_port: int
) -> None:
    assert probe_tls(f"127.0.0.1:{tls_port}", pki.ca_cert).startswith("TLS")
    checked = check_site(pki.site_dir("site-0"), f"localhost:{tls_port}")
    assert any("answers" in line for line in checked.lines)


def test_a_superlink_whose_certificate_this_site_cannot_trust_is_named(
    pki: PkiLayout, foreign_tls_port: int
) -> None:
    with pytest.raises(TransportError, match=rf"127.0.0.1:{foreign_tls_port} presented a cert"):
        probe_tls(f"127.0.0.1:{foreign_tls_port}", pki.ca_cert)


def test_a_host_name_the_certificate_does_not_name_fails_the_handshake(
    other: PkiLayout, foreign_tls_port: int
) -> None:
    # The right CA, but the certificate names superlink.example, not 127.0.0.1.
    with pytest.raises(TransportError, match="(?i)mismatch|IP address"):
        probe_tls(f"127.0.0.1:{foreign_tls_port}", other.ca_cert)


def test_a_superlink_address_that_does_not_answer_is_named(pki: PkiLayout) -> None:
    port = free_port()
    with pytest.raises(TransportError, match=rf"127.0.0.1:{port} does not answer"):
        probe_tls(f"127.0.0.1:{port}", pki.ca_cert, timeout=2)


@pytest.mark.parametrize("address", ["superlink", "host:", ":9092", "h:99999", "h:x"])
def test_a_malformed_address_is_refused(address: str) -> None:
    with pytest.raises(TransportError, match="is not host:port"):
        parse_address(address)


# -- the CLI -------------------------------------------------------------------------------


def test_cli_init_show_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert cli(["pki", "init", "--out", str(out), "--hosts", "127.0.0.1", "--sites", "2"]) == 0
    assert cli(["pki", "show", "--dir", str(out)]) == 0
    assert cli(["pki", "check", "--dir", str(out), "--hosts", "127.0.0.1"]) == 0
    assert "matches the certificate" in capsys.readouterr().out
    assert cli(["pki", "init", "--out", str(out), "--hosts", "x", "--sites", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    os.chmod(out / "sites/site-1/signing.key", 0o640)
    assert cli(["pki", "show", "--dir", str(out)]) == 1
    assert "TOO OPEN" in capsys.readouterr().out


def test_cli_supernode_checks_then_starts_flower_with_tls_and_node_auth(
    pki: PkiLayout, tls_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    site = pki.site_dir("site-1")
    args = ["supernode", "--site-dir", str(site), "--partition-id", "1", "--num-partitions", "2"]
    assert cli([*args, "--superlink", f"127.0.0.1:{tls_port}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--root-certificates {site / 'ca.pem'}" in out
    assert f"--auth-supernode-private-key {site / 'node-auth.key'}" in out
    assert "partition-id=1 num-partitions=2" in out and "--insecure" not in out
    assert cli([*args, "--superlink", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 2
    assert "does not answer" in capsys.readouterr().err


def test_cli_superlink_checks_then_starts_flower_with_tls_and_node_auth(
    pki: PkiLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["superlink", "--pki", str(pki.root), "--hosts", "127.0.0.1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in out
    assert "--insecure" not in out
    assert cli(["superlink", "--pki", str(pki.root), "--hosts", "10.9.9.9", "--dry-run"]) == 2
    assert "not valid for '10.9.9.9'" in capsys.readouterr().err
