"""Bad input reaches the user as one line naming the key or path, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.cli import main as cli_main
from server.app import main as server_main
from tests.conftest import FlowerLog


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"lora.rnk": 4}, "unknown config key 'lora.rnk'; did you mean 'lora.rank'?"),
        ({"run.rounds": "three"}, "'run.rounds' = 'three' has the wrong type: expected int"),
        ({"strategy.name": "fedsgd"}, "'strategy.name' = 'fedsgd' is not one of"),
        ({"model.name": "/no/such/model"}, "/no/such/model does not exist"),
    ],
)
def test_server_refuses_bad_config_in_one_line_and_writes_nothing(
    overrides: dict[str, object], expected: str, tmp_path: Path, flwr_log: FlowerLog
) -> None:
    """The ServerApp logs one `fedllm:` line naming the problem and creates no run dir."""
    # Prepare
    run_config = {"run.output-dir": str(tmp_path), "run.name": "bad", **overrides}
    # Execute
    server_main(None, run_config)  # type: ignore[arg-type]  # fails before using the grid
    errors = flwr_log.errors()
    # Assert
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("fedllm: ") and expected in errors[0]
    assert not (tmp_path / "bad").exists()


def test_rank_larger_than_layer_names_the_key_and_the_limit(
    tiny_model_dir: Path, tmp_path: Path, flwr_log: FlowerLog
) -> None:
    """A LoRA rank above min(in, out) of a target layer is refused before any training."""
    # Prepare
    run_config = {
        "model.name": str(tiny_model_dir),
        "lora.rank": 4096,
        "run.output-dir": str(tmp_path),
        "run.name": "bad",
    }
    # Execute
    server_main(None, run_config)  # type: ignore[arg-type]
    errors = flwr_log.errors()
    # Assert
    assert len(errors) == 1
    assert "'lora.rank' = 4096 is larger than layer" in errors[0]
    assert "use lora.rank <=" in errors[0]
    assert not (tmp_path / "bad").exists()


def test_cli_errors_are_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm runs show` on a directory that is not a run says so in one line, exit 2."""
    # Prepare
    (tmp_path / "empty").mkdir()
    # Execute
    code = cli_main(["runs", "show", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    # Assert
    assert code == 2
    assert err.count("\n") == 1
    assert "is not a fedllm run directory" in err and "Traceback" not in err
