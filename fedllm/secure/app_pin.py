"""A site runs only the app it reviewed: the SuperNode refuses a run whose FAB is not pinned.

In Flower's Deployment Engine the ClientApp's code comes from the run's FAB, which whoever
runs `flwr run` builds and the SuperLink hands to every SuperNode. Every check a site
makes (its policy, its budget, the coordinator's signature) runs inside that code, so a
coordinator that ships its own ClientApp could skip them all. A site therefore pins the
FABs it accepts by SHA-256 (`fedllm supernode --app-sha256 HASH`, the value `fedllm site
app-hash DIR` prints for the app directory it reviewed): before a run's FAB is stored, and
so before any of its code runs, the SuperNode hashes it and answers a FAB it did not pin
with Flower's own FAB-verification error. Flower builds FABs deterministically (fixed
timestamps, sorted files), so the same app directory always gives the same hash.

Written by hand because Flower 1.41's own check (`flower-supernode --trusted-entities`)
accepts only FABs verified by the Flower platform (a `valid_license` the SuperLink obtains
from it), which a self-hosted SuperLink does not have. The pin wraps Flower's
`_pull_and_store_message` (the step that fetches a new run's FAB) and drives its
trusted-entities branch with this hash check; `install_pin` refuses to start on a Flower
whose function no longer has that shape. What the pin does not check: the run config
(the sites' policies and the coordinator's signed instructions do) or the Python
environment the app imports (the site's own installation).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
from collections.abc import Callable, Collection
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from flwr.supercore.fab import Fab

from fedllm.errors import ConfigError

__all__ = ["app_sha256", "check_pins", "install_pin", "main", "pinned_fab"]

_PINNED = "pinned-by-site"  # the mark a pinned FAB carries into Flower's check
_ENTITY = {"fedllm-app-pin": "the site's --app-sha256 list"}


def app_sha256(app: str | Path) -> str:
    """SHA-256 of the FAB `flwr run` builds from the app directory `app`."""
    # heavy: flwr.cli.build pulls in Flower's CLI (~0.3 s); only this command needs it
    from flwr.cli.build import build_fab_from_disk

    path = Path(app).expanduser()
    if not (path / "pyproject.toml").is_file():
        raise ConfigError(f"{path} is not a Flower app directory (it has no pyproject.toml).")
    return hashlib.sha256(build_fab_from_disk(path)).hexdigest()


def check_pins(pins: Collection[str]) -> frozenset[str]:
    """The pins as lower-case hex, each a SHA-256 (64 hex digits), or ConfigError."""
    out = set()
    for pin in pins:
        value = pin.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ConfigError(
                f"--app-sha256 {pin!r} is not a SHA-256 (64 hex digits); `fedllm site "
                "app-hash DIR` prints the value for an app directory."
            )
        out.add(value)
    return frozenset(out)


def pinned_fab(fab: Fab, allowed: frozenset[str], run_id: int) -> Fab:
    """`fab` marked as verified when its content's SHA-256 is pinned; otherwise without any
    verification, which Flower's check answers with its FAB-verification error."""
    digest = hashlib.sha256(fab.content).hexdigest()
    if digest in allowed:
        log(INFO, "fedllm: run %d's app is pinned (FAB SHA-256 %s)", run_id, digest)
        return Fab(fab.hash_str, fab.content, {**fab.verifications, "valid_license": _PINNED})
    log(
        ERROR,
        "fedllm: this site refuses run %d: its app (FAB SHA-256 %s) is not one the site "
        "pinned (--app-sha256); none of its code runs here",
        run_id,
        digest,
    )
    return Fab(fab.hash_str, fab.content, {})


def install_pin(allowed: frozenset[str]) -> None:
    """Make this process's SuperNode accept only FABs in `allowed` (see the module doc)."""
    # heavy: Flower's SuperNode; only the pinned SuperNode process imports it
    import flwr.supernode.start_client_internal as sci

    original: Callable[..., Any] = sci._pull_and_store_message
    signature = inspect.signature(original)
    if not {"get_fab", "trusted_entities"} <= set(signature.parameters) or not hasattr(
        sci, "_verify_fab"
    ):
        raise ConfigError(
            "this Flower's SuperNode no longer fetches a run's FAB the way fedllm's app pin "
            "checks it (flwr.supernode.start_client_internal changed); refusing to start "
            "unpinned."
        )

    def pull(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        get_fab = bound.arguments["get_fab"]
        bound.arguments["get_fab"] = lambda fab_hash, run_id: pinned_fab(
            get_fab(fab_hash, run_id), allowed, run_id
        )
        bound.arguments["trusted_entities"] = _ENTITY
        return original(*bound.args, **bound.kwargs)

    sci._pull_and_store_message = pull
    sci._verify_fab = lambda fab, _entities: fab.verifications.get("valid_license") == _PINNED


def main(argv: list[str] | None = None) -> int:
    """`python -m fedllm.secure.app_pin --app-sha256 H [...] -- <flower-supernode args>`:
    Flower's SuperNode, pinned (what `fedllm supernode --app-sha256` runs)."""
    parser = argparse.ArgumentParser(prog="fedllm-pinned-supernode")
    parser.add_argument("--app-sha256", action="append", required=True)
    parser.add_argument("flower_args", nargs="*")
    args = parser.parse_args(argv)
    if "--trusted-entities" in args.flower_args:
        raise SystemExit("fedllm: --app-sha256 and --trusted-entities cannot be combined.")
    try:
        install_pin(check_pins(args.app_sha256))
    except ConfigError as e:
        raise SystemExit(f"fedllm: error: {e}") from None
    # heavy: Flower's SuperNode CLI, run in this process once the pin is in place
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args.flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
