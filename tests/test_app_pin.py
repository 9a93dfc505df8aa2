"""A site runs only the app it pinned: the FAB's SHA-256 is checked in the SuperNode, before
any of the app's code runs (issue 16; the real SuperNode is in the deployment test)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.fab import Fab

from fedllm.cli import main as cli
from fedllm.cli.deploy import supernode_command
from fedllm.errors import ConfigError
from fedllm.secure.app_pin import app_sha256, check_pins, install_pin, pinned_fab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def app(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy(REPO / "pyproject.toml", folder / "pyproject.toml")
    (folder / "extra.py").write_text("VALUE = 1\n")
    return folder


def test_the_hash_is_the_sha256_of_the_fab_flower_builds(app: Path, tmp_path: Path) -> None:
    out = tmp_path / "built"
    out.mkdir()
    subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)],
        cwd=out,
        check=True,
        capture_output=True,
    )
    (fab,) = out.glob("*.fab")
    assert app_sha256(app) == hashlib.sha256(fab.read_bytes()).hexdigest()


def test_the_hash_is_the_same_for_the_same_files_and_changes_with_any_file(app: Path) -> None:
    first = app_sha256(app)
    (app / "extra.py").touch()  # a new mtime: Flower's FAB has fixed timestamps
    assert app_sha256(app) == first
    (app / "extra.py").write_text("VALUE = 2\n")
    assert app_sha256(app) != first


def test_app_hash_prints_the_value_to_pin(app: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["site", "app-hash", str(app)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == app_sha256(app)
    assert "--app-sha256" in out.err


def test_a_folder_that_is_not_an_app_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a Flower app directory"):
        app_sha256(tmp_path)


def test_a_pin_that_is_not_a_sha256_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match="'abc' is not a SHA-256"):
        check_pins(["abc"])
    assert check_pins(["A" * 64]) == frozenset({"a" * 64})


def test_only_a_pinned_fab_is_marked_verified() -> None:
    content = b"a FAB"
    digest = hashlib.sha256(content).hexdigest()
    fab = Fab(digest, content, {"from-superlink": "x"})
    assert pinned_fab(fab, frozenset({digest}), run_id=1).verifications["valid_license"]
    assert pinned_fab(fab, frozenset({"0" * 64}), run_id=1).verifications == {}
    # the SuperLink's own claim is not what is checked: the content is hashed
    liar = Fab(digest, b"other code", {})
    assert pinned_fab(liar, frozenset({digest}), run_id=1).verifications == {}


@pytest.fixture()
def flower_supernode() -> Iterator[object]:
    # heavy: Flower's SuperNode module, patched and restored around the test
    import flwr.supernode.start_client_internal as sci

    saved = (sci._pull_and_store_message, sci._verify_fab)
    yield sci
    sci._pull_and_store_message, sci._verify_fab = saved


def test_the_pin_drives_flowers_own_fab_check(flower_supernode: object) -> None:
    """Flower's `_pull_and_store_message` is called with a checking `get_fab` and the
    trusted-entities branch on, so Flower itself answers an unpinned FAB with its error."""
    sci = flower_supernode
    content = b"pinned"
    digest = hashlib.sha256(content).hexdigest()
    seen: dict[str, object] = {}

    def fake_pull(state, object_store, node_config, receive, get_run, get_fab,  # noqa: ANN001
                  pull_object, confirm_message_received, trusted_entities):  # fmt: skip
        seen["trusted"] = trusted_entities
        seen["fab"] = get_fab(digest, 7)
        return 7

    sci._pull_and_store_message = fake_pull
    install_pin(frozenset({digest}))
    args = dict.fromkeys(
        ("state", "object_store", "node_config", "receive", "get_run", "pull_object",
         "confirm_message_received"),
    )  # fmt: skip
    get_fab = lambda _h, _r: Fab(digest, content, {})  # noqa: E731
    assert sci._pull_and_store_message(**args, get_fab=get_fab, trusted_entities=None) == 7
    assert seen["trusted"]
    assert sci._verify_fab(seen["fab"], seen["trusted"]) is True
    other = lambda _h, _r: Fab(digest, b"not pinned", {})  # noqa: E731
    sci._pull_and_store_message(**args, get_fab=other, trusted_entities=None)
    assert not seen["fab"].verifications.get("valid_license")
    assert sci._verify_fab(seen["fab"], seen["trusted"]) is False


def test_a_flower_whose_fab_step_changed_stops_the_pinned_supernode(
    flower_supernode: object,
) -> None:
    sci = flower_supernode
    sci._pull_and_store_message = lambda state: None
    with pytest.raises(ConfigError, match="refusing to start unpinned"):
        install_pin(frozenset({"0" * 64}))


def test_a_pinned_site_runs_flowers_supernode_through_the_pin(tmp_path: Path) -> None:
    cmd = supernode_command(
        tmp_path, "127.0.0.1:9092", partition_id=0, num_partitions=2, app_sha256=["a" * 64]
    )
    assert cmd[:3] == [sys.executable, "-m", "fedllm.secure.app_pin"]
    assert cmd[3:6] == ["--app-sha256", "a" * 64, "--"]
    assert "--superlink" in cmd and "--auth-supernode-private-key" in cmd
    plain = supernode_command(tmp_path, "127.0.0.1:9092", partition_id=0, num_partitions=2)
    assert plain[0] == "flower-supernode" and cmd[6:] == plain[1:]
