"""End-to-end: real Flower Simulation Engine, real Opacus, a tiny model built by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import (
    GENESIS,
    SITE_SIGNATURE,
    Ledger,
    record_hash,
    record_signer,
    signed_body,
)
from fedllm.rundir import RunDir
from fedllm.secure.pki import PkiLayout, init_pki, load_signing_key
from tests.opened import opened_files
from tests.simulate import simulate

pytestmark = pytest.mark.slow

SITES = 3


def _simulate(overrides: dict[str, Any], client_app: Any = None) -> None:
    simulate(overrides, sites=SITES, client_app=client_app)


def _wiretap(overrides: dict[str, Any], log: Path) -> Any:
    """fedllm's ClientApp, writing the name and shape of every tensor in every message it gets
    and every reply it sends (one JSON line each) to `log`."""
    from flwr.clientapp import ClientApp

    from clients.app import create_app

    inner, app = create_app(overrides), ClientApp()

    def relay(msg: Any, context: Any) -> Any:
        reply = inner(msg, context)
        kind = msg.metadata.message_type
        with log.open("a") as f:
            for way, m in (("down", msg), ("up", reply)):
                tensors = {
                    name: list(array.shape)
                    for record in m.content.array_records.values()
                    for name, array in record.items()
                }
                f.write(json.dumps({"way": way, "kind": kind, "tensors": tensors}) + "\n")
        return reply

    app.train()(relay)
    app.evaluate()(relay)
    return app


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two DP rounds on three by-topic sites, every message signed both ways; shared by the
    assertions below. The files this (the coordinator's) process opens are recorded."""
    out = tmp_path_factory.mktemp("runs")
    pki = PkiLayout(out / "pki")
    init_pki(pki.root, hosts=["localhost"], sites=[f"site-{k}" for k in range(SITES)])
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "tiny-dp",
        "run.output-dir": str(out),
        "run.rounds": 2,
        # DP noise and Poisson sampling are seeded from the OS, so every run differs. With 4
        # local steps at sigma 0.5 a site's held-out loss rose in 1 of 4 trials (and in a
        # fresh-clone CI run); with 8 it fell on every site in 4 of 4, by 0.006 to 0.046,
        # about 3 standard deviations of the trials' spread at the closest site.
        "train.local-steps": 8,
        "train.batch-size": 32,
        "train.learning-rate": 0.05,
        "privacy.noise-multiplier": 0.5,
        "data.max-length": 256,
        "eval.max-examples": 16,
        "security.sign-updates": True,
        "security.registry": str(pki.registry),
        "security.coordinator-key": str(pki.coordinator_key),
        "security.coordinator-public-key": str(pki.coordinator_pub),
        "security.site-signing-key": str(pki.root / "sites" / "site-{partition}" / "signing.key"),
    }
    wire_log = out / "wire.jsonl"
    with opened_files() as opened:
        _simulate(overrides, client_app=_wiretap(overrides, wire_log))
    run_dir = out / "tiny-dp"
    return {
        "dir": run_dir,
        "pki": pki,
        "opened": opened,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "overrides": overrides,
        "wire": [json.loads(line) for line in wire_log.read_text().splitlines()],
    }


def test_dp_run_completes_and_held_out_loss_falls_on_every_site(dp_run: dict[str, Any]) -> None:
    """Two DP rounds finish and every site's held-out loss ends below its round-0 value."""
    # Prepare
    summary = dp_run["summary"]
    # Execute
    sites = summary["sites"]
    # Assert
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 2
    assert len(summary["eval_loss"]) == 3  # round 0, 1, 2
    assert len(sites) == SITES
    for site, info in sites.items():
        assert info["eval_loss"][-1] < info["eval_loss"][0], site


def test_reported_epsilon_is_cumulative_over_the_whole_history(dp_run: dict[str, Any]) -> None:
    """The ε a site reports after k rounds equals the accountants run over all k rounds."""
    # Prepare
    summary, run_dir = dp_run["summary"], dp_run["dir"]
    for site, info in summary["sites"].items():
        records = Ledger(RunDir.site_ledger_path(run_dir, int(site))).records()
        sigma, q, steps = (records[0][k] for k in ("noise_multiplier", "sample_rate", "steps"))
        # Execute
        recomputed = [
            epsilon_report([(sigma, q, steps)] * k, delta=summary["delta"][site]) for k in (1, 2)
        ]
        # Assert
        assert [r["round"] for r in records] == [1, 2]
        assert info["epsilon"]["1"] == pytest.approx(recomputed[0]["epsilon"], rel=1e-9)
        assert info["epsilon"]["2"] == pytest.approx(recomputed[1]["epsilon"], rel=1e-9)
        assert info["epsilon"]["2"] > info["epsilon"]["1"] > 0
        assert recomputed[1]["rdp"] >= info["epsilon"]["2"]  # RDP is the looser bound
        assert summary["delta"][site] < 1 / info["num_examples"]


def test_ledgers_verify_and_a_flipped_byte_is_caught(
    dp_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm audit verify` passes the run's ledgers and names the record a flipped byte hits."""
    # Prepare
    import shutil

    from fedllm.cli import main as cli_main

    ok_code = cli_main(["audit", "verify", str(dp_run["dir"])])
    ok_out = capsys.readouterr().out
    copy = tmp_path / "run"
    shutil.copytree(dp_run["dir"], copy)
    ledger = copy / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    steps = dp_run["overrides"]["train.local-steps"]
    flipped = lines[1].replace(f'"steps": {steps}', f'"steps": {steps + 1}')  # one byte
    assert flipped != lines[1]
    lines[1] = flipped  # the second record
    ledger.write_text("".join(lines))
    # Execute
    bad_code = cli_main(["audit", "verify", str(copy)])
    bad_out = capsys.readouterr().out
    # Assert
    assert ok_code == 0 and ok_out.count("OK   /") == 1 + len(dp_run["summary"]["sites"])
    assert "OK   cross-check" in ok_out
    assert len(Ledger(dp_run["dir"] / "ledger.jsonl").records()) == 2 * SITES
    assert bad_code == 1
    assert "FAIL" in bad_out and "record 2 (seq 2" in bad_out


def test_only_adapter_tensors_travel(dp_run: dict[str, Any], tiny_model_dir: Path) -> None:
    """Every message either way carries exactly the trainable adapter (by name and shape),
    never a tensor shaped like a base weight; the byte counts are those of the adapter."""
    # Prepare
    from safetensors.numpy import load_file

    from fedllm.config import LoraConfig, ModelConfig
    from fedllm.model import adapter_spec, init_adapter
    from fedllm.wire import arrays_to_record, record_bytes

    summary = dp_run["summary"]
    spec = adapter_spec(ModelConfig(name=str(tiny_model_dir)), LoraConfig(ffa=True))
    init = init_adapter(spec, seed=0)
    per_message = record_bytes(arrays_to_record({n: init[n] for n in spec.sent}))
    base_shapes = {
        tuple(w.shape)
        for f in tiny_model_dir.glob("*.safetensors")
        for w in load_file(str(f)).values()
    }
    sent = {n: list(spec.shapes[n]) for n in spec.sent}
    # Execute
    rounds = {b["round"]: b for b in summary["bytes_per_round"]}
    carrying = [m for m in dp_run["wire"] if m["tensors"]]
    # Assert
    assert all(".lora_B." in n for n in spec.sent)  # FFA-LoRA sends only B
    assert base_shapes and not base_shapes & {tuple(s) for s in sent.values()}
    kinds = [(m["way"], m["kind"]) for m in carrying]
    assert kinds.count(("up", "train")) == 2 * SITES and ("up", "evaluate") not in kinds
    assert kinds.count(("down", "train")) == 2 * SITES
    assert kinds.count(("down", "evaluate")) == 3 * SITES  # rounds 0, 1 and 2
    assert all(m["tensors"] == sent for m in carrying)
    assert summary["adapter"]["sent_parameters"] == sum(init[n].size for n in spec.sent)
    assert rounds[0] == {"round": 0, "up": 0, "down": SITES * per_message}
    assert rounds[1]["down"] == 2 * SITES * per_message  # train + evaluate messages
    assert rounds[1]["up"] == SITES * per_message


def test_checkpoint_loads_with_peft(dp_run: dict[str, Any], tiny_model_dir: Path) -> None:
    """The final checkpoint is a peft adapter that `PeftModel.from_pretrained` loads."""
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = Path(dp_run["summary"]["adapter"]["final_checkpoint"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # Execute
    model = PeftModel.from_pretrained(base, ckpt)
    # Assert
    assert ckpt.name == "round-2"
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(float(p.abs().sum()) > 0 for p in b)


def test_rerun_with_same_name_resumes_without_retraining(dp_run: dict[str, Any]) -> None:
    """Asking the finished run for one more round trains only round 3: each ledger holds
    rounds 1, 2 and 3 once each, and ε after round 3 is the three-round value (a resume that
    restarted from round 1 would have spent five rounds)."""
    # Prepare
    overrides = {**dp_run["overrides"], "run.rounds": 3}
    before = dp_run["summary"]
    # Execute
    _simulate(overrides)
    summary = json.loads((dp_run["dir"] / "summary.json").read_text())
    # Assert
    assert summary["rounds_completed"] == 3
    assert [b["round"] for b in summary["bytes_per_round"]] == [0, 1, 2, 3]
    run_records = Ledger(dp_run["dir"] / "ledger.jsonl").records()
    for site, info in summary["sites"].items():
        records = Ledger(RunDir.site_ledger_path(dp_run["dir"], int(site))).records()
        assert [r["round"] for r in records] == [1, 2, 3]
        assert sorted(r["round"] for r in run_records if r["site"] == int(site)) == [1, 2, 3]
        sigma, q, steps = (records[0][k] for k in ("noise_multiplier", "sample_rate", "steps"))
        three = epsilon_report([(sigma, q, steps)] * 3, delta=summary["delta"][site])
        assert info["epsilon"]["3"] == pytest.approx(three["epsilon"], rel=1e-9)
        assert info["epsilon"]["2"] == before["sites"][site]["epsilon"]["2"]


def _adapter_copy(checkpoint: Path, out: Path, scale_b: float) -> Path:
    """A copy of a plaintext peft checkpoint with every LoRA B multiplied by `scale_b`."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from fedllm.model import ADAPTER_FILE

    shutil.copytree(checkpoint, out)
    tensors = load_file(out / ADAPTER_FILE)
    scaled = {n: t * scale_b if ".lora_B." in n else t for n, t in tensors.items()}
    save_file(scaled, out / ADAPTER_FILE)
    return out


def test_cli_shows_the_run_and_generates_with_its_adapter(
    dp_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm runs show` prints the per-site table; `fedllm generate --run` answers with the
    final adapter the run's summary names applied. The tiny model's DP-trained adapter is too
    small to change its answer, so a copy of the run names a strong one (B x 1000): `--run`
    then answers as that adapter does, and not as the base model (B = 0)."""
    # Prepare
    import shutil

    from fedllm.cli import main as cli_main

    final = Path(dp_run["summary"]["adapter"]["final_checkpoint"])
    strong = _adapter_copy(final, tmp_path / "strong", 1000.0)
    base = _adapter_copy(final, tmp_path / "zero", 0.0)
    copy = tmp_path / "run"
    shutil.copytree(dp_run["dir"], copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["adapter"]["final_checkpoint"] = str(strong)
    (copy / "summary.json").write_text(json.dumps(summary))

    def generate(run: Path, *extra: str) -> str:
        args = ["generate", "--run", str(run), "--max-new-tokens", "8", *extra, "What is AI?"]
        assert cli_main(args) == 0
        return capsys.readouterr().out

    # Execute
    show_code = cli_main(["runs", "show", str(dp_run["dir"])])
    shown = capsys.readouterr().out
    answer = generate(dp_run["dir"])
    by_run = generate(copy)
    by_hand = generate(copy, "--adapter", str(strong))
    by_base = generate(copy, "--adapter", str(base))
    # Assert
    assert show_code == 0
    assert "tiny-dp" in shown and "epsilon" in shown and "final adapter" in shown
    assert answer.endswith("\n")
    assert by_run == by_hand and by_run != by_base


def test_audit_report_is_self_contained_and_states_the_ledger_check(
    dp_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm audit report` writes HTML with embedded plots and markdown tables; a tampered
    ledger turns its integrity line into FAILED and the command's exit code into 1."""
    # Prepare
    import shutil

    from fedllm.cli import main as cli_main

    copy = tmp_path / "run"
    shutil.copytree(dp_run["dir"], copy)
    # Execute
    ok_code = cli_main(["audit", "report", str(copy)])
    page = (copy / "audit-report.html").read_text()
    markdown = (copy / "audit-report.md").read_text()
    ledger = copy / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"sample_rate": 0.', '"sample_rate": 1.', 1))
    bad_code = cli_main(["audit", "report", str(copy)])
    bad_page = (copy / "audit-report.html").read_text()
    capsys.readouterr()
    # Assert
    assert ok_code == 0 and bad_code == 1
    assert "VERIFIED" in page and page.count("data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page  # nothing to fetch: self-contained
    for heading in ("Mechanisms and parameters", "Accountant comparison", "Budget status"):
        assert heading in markdown
    assert dp_run["summary"]["config_hash"] in markdown
    assert "FAILED" in bad_page and "record 1 (seq 1" in bad_page


# -- signatures: what an auditor checks without trusting the coordinator --------------------


def test_the_coordinator_opens_no_sites_private_key(dp_run: dict[str, Any]) -> None:
    """The coordinator's process read its own key and the registry, and no file holding a
    site's private key (those are read only in the sites' processes)."""
    opened = {Path(p).resolve() for p in dp_run["opened"]}
    pki: PkiLayout = dp_run["pki"]
    assert pki.coordinator_key.resolve() in opened and pki.registry.resolve() in opened
    site_secrets = {p.resolve() for p in (pki.root / "sites").rglob("*.key")}
    assert len(site_secrets) == 2 * SITES
    assert opened & site_secrets == set()


def _rechain(records: list[dict[str, Any]], sign: Any = None) -> list[dict[str, Any]]:
    """What a forger with the files does: renumber, re-link and re-hash every record, and
    re-sign it if it holds a key (else it drops the signature it cannot remake)."""
    previous = GENESIS
    for seq, record in enumerate(records, start=1):
        record.update(seq=seq, prev_sha256=previous)
        record.pop(SITE_SIGNATURE, None)
        if sign is not None:
            record[SITE_SIGNATURE] = sign(signed_body(record))
        record["sha256"] = previous = record_hash(record)
    return records


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _reaccount(records: list[dict[str, Any]], site: int, sigma: float) -> None:
    """Claim site `site`'s round-1 spend at `sigma` (a smaller ε) and make every epsilon
    claim of its later spends agree with that history again."""
    history = []
    for record in (r for r in records if r["site"] == site):
        if record["round"] == 1:
            record["noise_multiplier"] = sigma
        history.append((record["noise_multiplier"], record["sample_rate"], record["steps"]))
        report = epsilon_report(history, delta=record["delta"])
        record["epsilon"] = {m: float(report[m]) for m in MECHANISMS}
        record["guarantee"] = float(report["epsilon"])


def test_a_signed_run_verifies_end_to_end(
    dp_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every instruction was signed and checked, every reply and ledger record signed: the
    run's ledger carries each site's signed record, and the manifest verifies."""
    from fedllm.cli import main as cli_main

    pki: PkiLayout = dp_run["pki"]
    code = cli_main(
        ["audit", "verify", str(dp_run["dir"]), "--coordinator-key", str(pki.coordinator_pub)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK   signatures" in out and f"from {pki.coordinator_pub}" in out
    run = Ledger(dp_run["dir"] / "ledger.jsonl").records()
    assert all(r["site_record"]["site_signature"]["ed25519"] for r in run)
    verified = dp_run["summary"]["security"]["verified"]
    assert all(sorted(verified[str(r)]["train"]) == [0, 1, 2] for r in (1, 2))


def _forge_dropped_last_run_record(run: Path, pki: PkiLayout) -> str:
    ledger = run / "ledger.jsonl"
    records = Ledger(ledger).records()
    _write(ledger, records[:-1])  # a cut keeps the chain intact
    n = len(records)
    return f"the run's ledger holds {n - 1} records; the manifest signed {n} (cut short"


def _forge_dropped_last_site_record(run: Path, pki: PkiLayout) -> str:
    ledger = RunDir.site_ledger_path(run, 0)
    records = Ledger(ledger).records()
    _write(ledger, records[:-1])
    n = len(records)
    return f"site 0's ledger holds {n - 1} records; the manifest signed {n} (cut short"


def _forge_rechained_epsilon(run: Path, pki: PkiLayout) -> str:
    """Site 0's ledger, its first spend claimed at a larger sigma (so a smaller ε), every ε
    recomputed from it and the chain rebuilt: only the site's signature can tell."""
    ledger = RunDir.site_ledger_path(run, 0)
    records = Ledger(ledger).records()
    _reaccount(records, 0, 3.0)
    _write(ledger, _rechain(records, sign=None))
    return "site 0's ledger, record 1: not signed by site 'site-0'"


def _forge_signed_by_another_site(run: Path, pki: PkiLayout) -> str:
    """Site 0's ledger re-signed with site 1's key (a site that would speak for another)."""
    ledger = RunDir.site_ledger_path(run, 0)
    other = record_signer(load_signing_key(pki.signing_key("site-1")))
    _write(ledger, _rechain(Ledger(ledger).records(), sign=other))
    return "site 0's ledger, record 1: signed by key"


def _forge_run_ledger_disagreeing(run: Path, pki: PkiLayout) -> str:
    """The run's ledger: site 0's round-1 spend at another sigma, re-accounted, re-chained."""
    ledger = run / "ledger.jsonl"
    records = Ledger(ledger).records()
    _reaccount(records, 0, 3.0)
    _write(ledger, _rechain(records))
    return "(site 0, round 1): differs from the site's signed record (noise_multiplier"


@pytest.mark.parametrize(
    "forge",
    [
        _forge_dropped_last_run_record,
        _forge_dropped_last_site_record,
        _forge_rechained_epsilon,
        _forge_signed_by_another_site,
        _forge_run_ledger_disagreeing,
    ],
    ids=lambda f: f.__name__.removeprefix("_forge_"),
)
def test_audit_verify_names_what_a_forger_changed(
    forge: Any, dp_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each forgery keeps every hash chain intact and every ε consistent with its own
    parameters; the signatures (the sites' and the manifest's) still name it."""
    import shutil

    from fedllm.cli import main as cli_main
    from fedllm.privacy.verify import verify_records

    copy = tmp_path / "run"
    shutil.copytree(dp_run["dir"], copy)
    expected = forge(copy, dp_run["pki"])
    for path in RunDir.at(copy).ledger_paths():  # the forger's own check passes
        assert not [p for p in verify_records(Ledger(path).records()) if "epsilon" in p]
    code = cli_main(
        ["audit", "verify", str(copy), "--coordinator-key", str(dp_run["pki"].coordinator_pub)]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert expected in out, out
