"""End-to-end: real Flower Simulation Engine, real Opacus, a tiny model built by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir
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
    """Two DP rounds on three by-topic sites; shared by the assertions below."""
    out = tmp_path_factory.mktemp("runs")
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "tiny-dp",
        "run.output-dir": str(out),
        "run.rounds": 2,
        "train.local-steps": 4,
        "train.batch-size": 32,
        "train.learning-rate": 0.05,
        "privacy.noise-multiplier": 0.7,
        "data.max-length": 256,
        "eval.max-examples": 16,
    }
    wire_log = out / "wire.jsonl"
    _simulate(overrides, client_app=_wiretap(overrides, wire_log))
    run_dir = out / "tiny-dp"
    return {
        "dir": run_dir,
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
    lines[1] = lines[1].replace('"steps": 4', '"steps": 5')  # one byte, second record
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
