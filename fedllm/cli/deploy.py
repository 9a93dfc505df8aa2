"""`fedllm pki ...`, `fedllm superlink`, `fedllm supernode`: a multi-site deployment.

`superlink` and `supernode` check certificates, key files and the SuperLink's address
(`fedllm.secure.preflight`) and then hand over to Flower's own `flower-superlink` /
`flower-supernode` with TLS and node authentication switched on, so a mistake is named
before any training starts rather than surfacing as Flower exit code 305 after its retries.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.errors import FedllmError

__all__ = ["add_parsers", "supernode_command"]

DEFAULT_PKI = "keys/pki"
DEFAULT_PORT = 9092


def _print_checked(lines: list[str]) -> None:
    for line in lines:
        print(f"  ok  {line}")


def cmd_pki_init(args: argparse.Namespace) -> int:
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.pki import PkiLayout, init_pki, parse_sites

    sites = parse_sites(args.sites) if args.sites else []
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    registry = init_pki(Path(args.out), hosts=hosts, sites=sites, days=args.days, force=args.force)
    layout = PkiLayout(Path(args.out))
    print(f"CA and SuperLink certificate for {', '.join(hosts)} (valid {args.days} days):")
    print(f"  {layout.ca_key}  (0600) the CA key: keep it offline")
    print(f"  {layout.server_cert}, {layout.server_key} (0600): the coordinator's TLS pair")
    print(f"  {layout.coordinator_key} (0600): signs the registry, instructions and manifests")
    print(f"  {layout.ca_cert}, {layout.coordinator_pub}: give both to every site and auditor")
    print(
        f"  {layout.registry}: the sites' public keys, signed (coordinator key "
        f"{registry['coordinator']['key-id'][:16]}...)"
    )
    for site, entry in registry["sites"].items():
        print(
            f"  {layout.site_dir(site)}/  partition-id {entry['partition-id']}: node-auth.key, "
            f"signing.key (0600), ca.pem, coordinator.pub -> to {site} only; signing key "
            f"{entry['signing-key-id'][:16]}..."
        )
    if sites:
        print(
            "DEMO: every site's private keys were made here, so whoever holds this folder can "
            "sign as any site. Real sites run `fedllm site init NAME` and send you their "
            "enrolment.json for `fedllm pki enrol`."
        )
        print(
            "Register each site with the SuperLink: "
            f"`fedllm pki register --dir {args.out} --federation <connection>`."
        )
    else:
        print(
            "Next: each site runs `fedllm site init NAME --ca ca.pem --coordinator-key "
            "coordinator.pub`, and you add its enrolment.json with `fedllm pki enrol FILE`."
        )
    return 0


def cmd_pki_enrol(args: argparse.Namespace) -> int:
    """Add a site's enrolment file to the registry and re-sign it."""
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.pki import PkiLayout, load_signing_key  # heavy: as above
    from fedllm.secure.registry import enrol, load_enrolment  # heavy: as above

    layout = PkiLayout(Path(args.dir))
    enrolment = load_enrolment(Path(args.file))
    key = load_signing_key(layout.coordinator_key, "the coordinator's signing key")
    entry = enrol(layout.registry, enrolment, key, partition_id=args.partition_id)
    print(
        f"enrolled {enrolment['name']!r} as partition-id {entry['partition-id']} in "
        f"{layout.registry} (signing key {entry['signing-key-id'][:16]}...; check this id "
        "with the site out of band)"
    )
    print(
        f"  the site starts its SuperNode with --partition-id {entry['partition-id']}; "
        f"register its node key: `fedllm pki register --dir {args.dir} --sites "
        f"{enrolment['name']} --federation <connection>`"
    )
    return 0


def cmd_pki_show(args: argparse.Namespace) -> int:
    # heavy: rich and cryptography's x509 take ~0.3 s to import; keeps `fedllm --help` fast
    from rich.console import Console
    from rich.table import Table

    from fedllm.secure.pki import describe  # heavy: cryptography's x509

    rows = describe(Path(args.dir))
    table = Table(title=f"keys under {args.dir}")
    for col in ("file", "kind", "mode", "expires", "days left", "hosts / sites", "status"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["file"],
            r["kind"],
            r["mode"],
            r.get("expires", ""),
            str(r.get("days_left", "")),
            ", ".join(r.get("hosts", r.get("sites", []))),
            r["status"],
        )
    Console(width=160).print(table)
    bad = [r for r in rows if r["status"] != "ok"]
    return 1 if bad else 0


def cmd_pki_check(args: argparse.Namespace) -> int:
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.preflight import check_site, check_superlink

    if args.site_dir:
        checked = check_site(Path(args.site_dir), args.superlink, timeout=args.timeout)
    else:
        hosts = [h for h in (args.hosts or "").split(",") if h] or None
        checked = check_superlink(Path(args.dir), hosts)
    _print_checked(checked.lines)
    return 0


def cmd_pki_register(args: argparse.Namespace) -> int:
    """Register every enrolled site's node-auth key with the SuperLink through Flower's own
    CLI (the public key comes from the signed registry, not from a site's folder)."""
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.pki import PkiLayout, load_signing_key  # heavy: as above
    from fedllm.secure.registry import load_registry  # heavy: as above

    layout = PkiLayout(Path(args.dir))
    key = load_signing_key(layout.coordinator_key, "the coordinator's signing key")
    registry = load_registry(layout.registry, key.public_key())
    entries = json.loads(registry.raw)["sites"]
    for site in sorted(registry.sites.values(), key=lambda s: s.partition_id):
        if args.sites and site.name not in args.sites.split(","):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            public = Path(tmp) / f"{site.name}.pub"
            public.write_text(entries[site.name]["node-auth-public-key"] + "\n")
            cmd = ["flwr", "supernode", "register", str(public)]
            cmd += [args.federation] if args.federation else []
            cmd += ["--name", site.name]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = (done.stdout + done.stderr).strip().splitlines()
        if done.returncode != 0 and "already in use" in " ".join(text).lower():
            print(f"{site.name}: already registered")  # a re-run: the key is there
            continue
        print(f"{site.name}: {text[-1] if text else done.returncode}")
        if done.returncode != 0:
            raise FedllmError(f"registering {site.name} failed: {' '.join(text[-3:])}")
    return 0


def _exec(cmd: list[str], dry_run: bool) -> int:
    print("$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    if shutil.which(cmd[0]) is None:
        raise FedllmError(f"{cmd[0]} is not on PATH; install fedllm's environment first.")
    os.execvp(cmd[0], cmd)  # Flower takes over this process (signals reach it directly)
    return 0  # pragma: no cover


def cmd_superlink(args: argparse.Namespace) -> int:
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.pki import PkiLayout
    from fedllm.secure.preflight import check_superlink

    layout = PkiLayout(Path(args.pki))
    hosts = [h for h in (args.hosts or "").split(",") if h] or None
    _print_checked(check_superlink(layout.root, hosts).lines)
    cmd = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(layout.ca_cert),
        "--ssl-certfile",
        str(layout.server_cert),
        "--ssl-keyfile",
        str(layout.server_key),
        "--enable-supernode-auth",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.database:
        cmd += ["--database", args.database]
    return _exec(cmd + list(args.flower_args), args.dry_run)


def supernode_command(
    site_dir: Path,
    superlink: str,
    *,
    partition_id: int,
    num_partitions: int,
    port: int | None = None,
    node_config: str = "",
    app_sha256: Sequence[str] = (),
) -> list[str]:
    """The `flower-supernode` command line for a site: TLS to the federation's CA, node
    authentication with the site's P-384 key, its signing key and the coordinator's public
    key in the node config (the site then signs everything and checks every instruction,
    whatever the run config says). With `app_sha256`, Flower's SuperNode runs pinned
    (`fedllm.secure.app_pin`): a run whose FAB is not one of these is refused."""
    config = (
        f"partition-id={partition_id} num-partitions={num_partitions} "
        f'signing-key="{site_dir / "signing.key"}" '
        f'coordinator-key="{site_dir / "coordinator.pub"}" {node_config}'
    ).strip()
    cmd = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--root-certificates",
        str(site_dir / "ca.pem"),
        "--auth-supernode-private-key",
        str(site_dir / "node-auth.key"),
        "--node-config",
        config,
    ]
    cmd += ["--port", str(port)] if port else []
    if not app_sha256:
        return cmd
    pins = [arg for pin in app_sha256 for arg in ("--app-sha256", pin)]
    return [sys.executable, "-m", "fedllm.secure.app_pin", *pins, "--", *cmd[1:]]


def cmd_supernode(args: argparse.Namespace) -> int:
    # heavy: cryptography's x509 takes ~0.2 s to import; keeps `fedllm --help` fast
    from fedllm.secure.preflight import check_site

    site_dir = Path(args.site_dir)
    _print_checked(check_site(site_dir, args.superlink, timeout=args.timeout).lines)
    cmd = supernode_command(
        site_dir,
        args.superlink,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        port=args.port,
        node_config=args.node_config,
        app_sha256=args.app_sha256 or (),
    )
    if args.app_sha256:
        # heavy: the pin's check of its values needs Flower; only a pinned site loads it
        from fedllm.secure.app_pin import check_pins

        check_pins(args.app_sha256)
    else:
        print(
            "fedllm: warning: no --app-sha256: this site runs whatever ClientApp the run's FAB "
            "holds, and every check it makes runs inside that code. Pin the app you "
            "reviewed (`fedllm site app-hash DIR`).",
            flush=True,
        )
    return _exec(cmd + list(args.flower_args), args.dry_run)


def add_parsers(sub: Any) -> None:
    """`pki`, `superlink` and `supernode` under the main parser (`federation add` is in
    `fedllm.cli.federation`)."""
    pki_sub = verb_group(sub, "pki", "certificates and keys for a multi-site deployment")
    init = pki_sub.add_parser(
        "init", help="make the CA, the SuperLink cert, the coordinator's key and registry"
    )
    init.add_argument("--out", default=DEFAULT_PKI)
    init.add_argument("--hosts", required=True, help="names/IPs the sites dial, comma-separated")
    init.add_argument(
        "--sites",
        help="DEMO on one machine: also make these sites' keys here (a count or names)",
    )
    init.add_argument("--days", type=int, default=365, help="certificate lifetime")
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    init.set_defaults(func=cmd_pki_init)
    show = pki_sub.add_parser("show", help="list keys and certificates, expiry and modes")
    show.add_argument("--dir", default=DEFAULT_PKI)
    show.set_defaults(func=cmd_pki_show)
    check = pki_sub.add_parser("check", help="check a coordinator's or a site's files")
    check.add_argument("--dir", default=DEFAULT_PKI, help="the coordinator's pki directory")
    check.add_argument("--hosts", help="host names the certificate must name")
    check.add_argument("--site-dir", help="check a site's directory instead")
    check.add_argument("--superlink", help="with --site-dir: dial this host:port over TLS")
    check.add_argument("--timeout", type=float, default=5.0)
    check.set_defaults(func=cmd_pki_check)
    enrol_p = pki_sub.add_parser("enrol", help="add a site's enrolment file to the registry")
    enrol_p.add_argument("file", help="the enrolment.json a site made with `fedllm site init`")
    enrol_p.add_argument("--dir", default=DEFAULT_PKI, help="the coordinator's pki directory")
    enrol_p.add_argument("--partition-id", type=int, help="default: the next free one")
    enrol_p.set_defaults(func=cmd_pki_enrol)
    reg = pki_sub.add_parser("register", help="register the sites' node keys (flwr supernode)")
    reg.add_argument("--dir", default=DEFAULT_PKI)
    reg.add_argument("--federation", help="Flower connection of the SuperLink")
    reg.add_argument("--sites", help="only these site names, comma-separated")
    reg.set_defaults(func=cmd_pki_register)

    link = sub.add_parser("superlink", help="check the certificates, then run flower-superlink")
    link.add_argument("--pki", default=DEFAULT_PKI)
    link.add_argument("--hosts", help="host names the certificate must name")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=int, default=DEFAULT_PORT)
    link.add_argument("--database", help="SuperLink state file (default: in memory)")
    link.add_argument("--dry-run", action="store_true", help="check and print the command")
    link.add_argument("flower_args", nargs="*", help="after --: passed to flower-superlink")
    link.set_defaults(func=cmd_superlink)

    node = sub.add_parser("supernode", help="check a site's keys and the link, then run it")
    node.add_argument("--site-dir", required=True, help="the site's key folder (site init)")
    node.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    node.add_argument("--partition-id", type=int, required=True)
    node.add_argument("--num-partitions", type=int, required=True)
    node.add_argument("--port", type=int, help="the SuperNode's local API port")
    node.add_argument("--node-config", default="", help="more node config (key=value ...)")
    node.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for TLS")
    node.add_argument(
        "--app-sha256",
        action="append",
        help="run only this app (repeatable): the FAB SHA-256 `fedllm site app-hash` prints",
    )
    node.add_argument("--dry-run", action="store_true", help="check and print the command")
    node.add_argument("flower_args", nargs="*", help="after --: passed to flower-supernode")
    node.set_defaults(func=cmd_supernode)
