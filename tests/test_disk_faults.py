"""A full disk or an unwritable folder (issue 18): found before the run starts, with one
line; a write that fails mid-run names its file, keeps the last completed round intact and
leaves no half file under a final name, and a rerun resumes and completes.

The full disk is simulated at the syscall boundary Python writes through (`open`): the
write fails with ENOSPC after half its bytes reached the file, as a disk that fills up
mid-write does. Everything else is real: the ServerApp and ClientApp in this process
(`tests.inprocess`), DP-SGD, signatures, the ledgers and the checkpoints.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedllm.cli import main as cli
from fedllm.config import parse_config
from fedllm.disk import check_output_folder, checkpoint_bytes, needed_bytes
from fedllm.errors import DiskError
from fedllm.model import adapter_spec, init_adapter, load_adapter_arrays, save_peft_adapter
from fedllm.privacy.ledger import Ledger, verify_chain
from fedllm.secure.he_checkpoint import EncryptedAdapter, save_encrypted_adapter
from fedllm.secure.he_site import SiteHE
from fedllm.secure.pki import PkiLayout, init_pki
from server.app import main as server_main
from tests.conftest import FlowerLog
from tests.coordinator import he_settings, signed_settings
from tests.inprocess import run_in_process

SITES = 3
ENOSPC = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"

Hit = Callable[[Path, Path, str], bool]  # (run dir, file opened, mode) -> does it fail?


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two signed DP rounds: every file a run writes is written (the manifest needs signing,
    the run ledger record-level DP). The output folder is relative, so a copy of a run
    directory resumes from another working directory."""
    pki = PkiLayout(tmp_path_factory.mktemp("pki"))
    init_pki(pki.root, hosts=["localhost"], sites=[f"site-{k}" for k in range(SITES)])
    return {
        "model.name": str(tiny_model_dir),
        "run.name": "r",
        "run.output-dir": "out",
        "run.rounds": 2,
        "run.min-sites": SITES - 1,
        "train.local-steps": 1,
        "train.batch-size": 8,
        "privacy.noise-multiplier": 0.8,
        "eval.max-examples": 8,
        **signed_settings(pki),
    }


@pytest.fixture(scope="module")
def round_one(config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a run after round 1 (made once; each test resumes a copy)."""
    base = tmp_path_factory.mktemp("round-one")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        run_in_process({**config, "run.rounds": 1}, sites=SITES)
    return base / "out"


def _copy_of(round_one: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the run after round 1 in `tmp_path`, now the working directory."""
    shutil.copytree(round_one, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "out" / "r"


class _HalfWritten:
    """A file whose next write puts half its bytes on disk, then fails with ENOSPC."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _HalfWritten:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, run_dir: Path, hit: Hit) -> list[Path]:
    """The first write `hit` names fails; returns what failed."""
    real_open = io.open
    failed: list[Path] = []

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if failed or not set(mode) & set("wax+") or not isinstance(file, (str, os.PathLike)):
            return f
        path = Path(os.path.abspath(file))  # the sites name it relative to the run config's
        if hit(run_dir, path, mode):
            failed.append(path)
            return _HalfWritten(f)
        return f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's write_text and write_bytes
    return failed


def _tmp_of(name: str) -> Hit:
    """`name`'s temporary file, once round 2 is trained (its checkpoint is on disk)."""
    return lambda run, path, mode: (
        path == run / f".{name}.tmp" and (run / "checkpoints" / "round-2").is_dir()
    )


WRITES: dict[str, tuple[Hit, str]] = {  # what fails, and the file the line must name
    "state.json": (_tmp_of("state.json"), "state.json"),
    "summary.json": (_tmp_of("summary.json"), "summary.json"),
    "manifest.json": (_tmp_of("manifest.json"), "manifest.json"),
    "checkpoint": (
        lambda run, path, mode: path.parent == run / "checkpoints" / ".tmp-round-2",
        "checkpoints/round-2",
    ),
    "ledger append": (
        lambda run, path, mode: path == run / "ledger.jsonl" and "a" in mode,
        "ledger.jsonl",
    ),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_full_disk_mid_run_names_the_file_keeps_the_last_round_and_resumes(
    config: dict[str, Any],
    tmp_path: Path,
    round_one: Path,
    flwr_log: FlowerLog,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    write: str,
) -> None:
    # Prepare
    run_dir = _copy_of(round_one, tmp_path, monkeypatch)
    hit, named = WRITES[write]
    # Execute: round 2, and the disk fills up
    with pytest.MonkeyPatch.context() as full:
        failed = _fill_disk_at(full, run_dir, hit)
        run_in_process(config, sites=SITES)
    stopped_with = flwr_log.errors()
    # Assert: one line naming the file, and round 1 intact with no half file anywhere
    assert failed, "the fault never fired"
    assert stopped_with == [
        f"fedllm: could not write {run_dir / named}: {ENOSPC}; the run stops; round 1 (the "
        "last completed) is intact; rerun with the same run.name ('r') to resume"
    ]
    assert json.loads((run_dir / "state.json").read_text())["rounds_completed"] == 1
    assert load_adapter_arrays(run_dir / "checkpoints" / "round-1")
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert load_adapter_arrays(checkpoint)  # round 2's, where it exists, is whole
    for written in run_dir.rglob("*.json"):
        json.loads(written.read_text())
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    for ledger in [run_dir / "ledger.jsonl", *run_dir.glob("sites/*/ledger.jsonl")]:
        assert verify_chain(Ledger(ledger).records()) == []  # a torn tail is not a record

    # Execute: the same command again, with room on the disk
    run_in_process(config, sites=SITES)
    # Assert
    summary = json.loads((run_dir / "summary.json").read_text())
    assert flwr_log.errors() == stopped_with  # nothing more went wrong
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    keys = ["--registry", config["security.registry"]]
    keys += ["--coordinator-key", config["security.coordinator-public-key"]]
    assert cli(["audit", "verify", str(run_dir), *keys]) == 0, capsys.readouterr().out


def test_a_site_whose_disk_fills_up_fails_its_round_with_one_line_naming_its_file(
    config: dict[str, Any],
    tmp_path: Path,
    round_one: Path,
    flwr_log: FlowerLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Site 0's own ledger (in the run directory, as in a simulation) cannot take its round-2
    spend: the site does not train on, the coordinator records its one-line reason, and the
    round goes on with the other two."""
    # Prepare
    run_dir = _copy_of(round_one, tmp_path, monkeypatch)
    site_ledger = run_dir / "sites" / "site-0" / "ledger.jsonl"
    _fill_disk_at(monkeypatch, run_dir, lambda run, path, mode: path == site_ledger and "a" in mode)
    # Execute
    run_in_process(config, sites=SITES)
    # Assert
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [(f["round"], f["site"], f["reason"]) for f in summary["failures"]] == [
        (2, 0, f"could not write {site_ledger}: {ENOSPC}")
    ]
    assert summary["status"] == "completed" and flwr_log.errors() == []
    assert [p["aggregated"] for p in summary["participation"]] == [[0, 1, 2], [1, 2]]


def test_an_unwritable_output_folder_stops_the_run_before_it_starts(
    config: dict[str, Any],
    tmp_path: Path,
    flwr_log: FlowerLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One line naming the folder; nothing is written and no site is waited for (the grid
    is None: had the run gone on, it would have failed on it)."""
    # Prepare
    out = tmp_path / "locked"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through any mode bits: refuse at the syscall
        real = os.open

        def refused(path: Any, *args: Any, **kwargs: Any) -> int:
            if Path(path).parent == out:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refused)
    else:
        out.chmod(0o500)
    # Execute
    try:
        run_config = {**config, "run.output-dir": str(out)}
        server_main(None, run_config)  # type: ignore[arg-type]
    finally:
        out.chmod(0o700)
    # Assert
    assert flwr_log.errors() == [
        f"fedllm: cannot write in {out} ([Errno {errno.EACCES}] {os.strerror(errno.EACCES)}), "
        f"where the run directory {out / 'r'} goes; make it writable or choose another "
        "run.output-dir; the run stops; no round has completed; rerun with the same "
        "run.name ('r') to start it"
    ]
    assert list(out.iterdir()) == []


def test_an_output_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(DiskError, match=f"^{tmp_path / 'out'} is not a folder, so the run"):
        check_output_folder(tmp_path / "out" / "r", needed=0)


def test_too_little_free_space_stops_the_run_naming_bytes_needed_and_free(
    config: dict[str, Any],
    tmp_path: Path,
    flwr_log: FlowerLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    overrides = {**config, "run.output-dir": str(tmp_path / "out")}
    cfg = parse_config(overrides)
    needed = needed_bytes(cfg, adapter_spec(cfg.model, cfg.lora), rounds_done=0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=needed - 1))
    # Execute
    server_main(None, overrides)  # type: ignore[arg-type]
    # Assert: the nearest folder that exists is named (the run would make the rest)
    [line] = flwr_log.errors()
    assert line.startswith(f"fedllm: {tmp_path} has {needed - 1:,} bytes (")
    assert f"the run directory {tmp_path / 'out' / 'r'} needs about {needed:,} bytes" in line
    assert line.endswith(
        "; the run stops; no round has completed; rerun with the same run.name ('r') to start it"
    )
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=needed))
    check_output_folder(tmp_path / "out" / "r", needed=needed)  # exactly enough is enough


def test_the_estimate_bounds_a_real_checkpoint_in_plaintext_and_under_he(
    tiny_model_dir: Path, tmp_path: Path, he_keys: Path
) -> None:
    # Prepare
    plain = parse_config({"model.name": str(tiny_model_dir)})
    he = parse_config({"model.name": str(tiny_model_dir), **he_settings(he_keys)})
    spec = adapter_spec(plain.model, plain.lora)
    full = init_adapter(spec, seed=0)
    site = SiteHE.load(he, he.he.site_context, site=0)
    blobs = site.seal({n: full[n] for n in spec.sent}, weight=1.0, num_sites=1)
    # Execute
    save_peft_adapter(tmp_path / "plain", full, model_cfg=plain.model, lora_cfg=plain.lora)
    adapter = EncryptedAdapter(blobs=blobs, divisor=1.0, key=site.key, packing=site.packing)
    save_encrypted_adapter(tmp_path / "he", adapter, model=he.model.name)
    # Assert
    for cfg, written in ((plain, tmp_path / "plain"), (he, tmp_path / "he")):
        size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file())
        assert 0 < size <= checkpoint_bytes(cfg, spec), written.name
    assert checkpoint_bytes(he, spec) > checkpoint_bytes(plain, spec)
