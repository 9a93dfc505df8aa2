"""Tests for fedllm.config: flat Flower keys to a validated, typed configuration."""

from __future__ import annotations

import pathlib
import re
import tomllib
from typing import Any

import pytest

from fedllm.config import (
    FedllmConfig,
    config_hash,
    known_keys,
    parse_config,
)
from fedllm.errors import ConfigError, FedllmError

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn TOML's nested tables (`run.rounds = 3` -> {"run": {"rounds": 3}}) into dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _flower_defaults() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return _flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def test_empty_mapping_gives_the_defaults() -> None:
    """`parse_config({})` is the dataclass defaults, with the documented values."""
    # Execute
    cfg = parse_config({})

    # Assert
    assert cfg == FedllmConfig()
    assert cfg.run.rounds == 3
    assert cfg.lora.rank == 8
    assert cfg.lora.ffa is True
    assert cfg.lora.modules == ["q_proj", "v_proj"]
    assert cfg.privacy.noise_multiplier == 0.8
    assert cfg.privacy.accountant == "prv"
    assert cfg.privacy.record_level is True
    assert cfg.strategy.name == "fedavg"


def test_dotted_keys_map_to_nested_fields() -> None:
    """`privacy.noise-multiplier` sets `cfg.privacy.noise_multiplier` (dashes to underscores)."""
    # Prepare
    flat = {
        "privacy.noise-multiplier": 1.3,
        "lora.target-modules": "q_proj, k_proj ,v_proj",
        "train.physical-batch-size": 4,
        "model.trust-remote-code": True,
        "strategy.name": "fedadam",
    }

    # Execute
    cfg = parse_config(flat)

    # Assert
    assert cfg.privacy.noise_multiplier == 1.3
    assert cfg.lora.target_modules == "q_proj, k_proj ,v_proj"
    assert cfg.lora.modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.train.physical_batch_size == 4
    assert cfg.model.trust_remote_code is True
    assert cfg.strategy.name == "fedadam"
    assert cfg.run.rounds == 3  # untouched keys keep their defaults


def test_int_is_accepted_for_a_float_key() -> None:
    """TOML `privacy.noise-multiplier = 1` arrives as an int and becomes the float 1.0."""
    # Execute
    cfg = parse_config({"privacy.noise-multiplier": 1, "run.timeout": 60})

    # Assert
    assert cfg.privacy.noise_multiplier == 1.0
    assert isinstance(cfg.privacy.noise_multiplier, float)
    assert isinstance(cfg.run.timeout, float)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_close_key() -> None:
    """A typo names the key and suggests the known key it resembles."""
    # Execute / Assert
    with pytest.raises(
        ConfigError, match=r"unknown config key 'lora\.rnk'; did you mean 'lora\.rank'"
    ):
        parse_config({"lora.rnk": 4})


def test_unknown_key_without_a_close_match_points_to_the_key_list() -> None:
    """A key like nothing known points to `fedllm config keys` instead of guessing."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'; see `fedllm config keys`"):
        parse_config({"zzz": 1})


@pytest.mark.parametrize(
    ("flat", "expected", "got"),
    [
        ({"lora.rank": "8"}, "int", "str"),
        ({"lora.rank": 8.0}, "int", "float"),
        ({"lora.rank": True}, "int", "bool"),
        ({"privacy.noise-multiplier": "0.8"}, "float", "str"),
        ({"privacy.noise-multiplier": False}, "float", "bool"),
        ({"lora.ffa": 1}, "bool", "int"),
        ({"model.name": 3}, "str", "int"),
    ],
)
def test_wrong_type_names_the_key_and_both_types(
    flat: dict[str, Any], expected: str, got: str
) -> None:
    """A value of the wrong type is refused with the key, the expected and the actual type."""
    # Prepare
    key = next(iter(flat))

    # Execute / Assert
    with pytest.raises(
        ConfigError,
        match=rf"config key '{re.escape(key)}' = .* wrong type: expected {expected}, got {got}\.",
    ):
        parse_config(flat)


def test_value_outside_the_choices_lists_them() -> None:
    """A strategy name not in the list is refused and every allowed name is shown."""
    # Execute / Assert
    with pytest.raises(
        ConfigError,
        match=(
            r"config key 'strategy\.name' = 'fedsgd' is not one of: "
            r"fedavg, fedadam, fedyogi, fedadagrad, fedavgm, fedprox, fedmedian, "
            r"fedtrimmedavg, krum, multikrum, bulyan\."
        ),
    ):
        parse_config({"strategy.name": "fedsgd"})


def test_a_grad_sample_mode_opacus_cannot_run_here_is_refused_naming_those_that_work() -> None:
    """`ew` (expanded weights) needs Opacus to wrap the model, which fedllm does not do
    (`wrap_model=False` keeps parameter names): asking for it names the key and the modes
    that run."""
    # Execute / Assert
    with pytest.raises(
        ConfigError,
        match=r"config key 'privacy\.grad-sample-mode' = 'ew' is not one of: hooks, functorch\.",
    ):
        parse_config({"privacy.grad-sample-mode": "ew"})


@pytest.mark.parametrize(
    ("flat", "pattern"),
    [
        ({"lora.rank": 0}, r"config key 'lora\.rank' = 0 is invalid"),
        ({"run.rounds": 0}, r"config key 'run\.rounds' = 0 is invalid"),
        ({"data.eval-fraction": 1.5}, r"config key 'data\.eval-fraction' = 1\.5 is invalid"),
        ({"privacy.max-grad-norm": 0}, r"config key 'privacy\.max-grad-norm' = 0\.0 is invalid"),
        ({"privacy.noise-multiplier": -0.1}, r"'privacy\.noise-multiplier' = -0\.1 is invalid"),
        ({"privacy.delta": 1.0}, r"config key 'privacy\.delta' = 1\.0 is invalid"),
        ({"strategy.fraction-train": 0.0}, r"'strategy\.fraction-train' = 0\.0 is invalid"),
        ({"run.name": "a/b"}, r"config key 'run\.name' = 'a/b' is invalid"),
    ],
)
def test_out_of_range_value_names_key_and_value(flat: dict[str, Any], pattern: str) -> None:
    """A value outside its range is refused with the key and the offending value."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=pattern):
        parse_config(flat)


@pytest.mark.parametrize(
    "flat",
    [
        {"lora.rnk": 4},
        {"zzz": 1},
        {"lora.rank": "8"},
        {"strategy.name": "fedsgd"},
        {"lora.rank": 0},
        {"run.rounds": 0},
        {"data.eval-fraction": 1.5},
        {"privacy.max-grad-norm": 0},
        {"lora.target-modules": " , "},
        {"model.quantization": "4bit", "train.device": "cpu"},
        {"strategy.name": "fedprox", "strategy.proximal-mu": 0.0},
    ],
)
def test_every_error_is_a_one_line_config_error(flat: dict[str, Any]) -> None:
    """Every refusal is a `ConfigError` (a `FedllmError`) whose message is a single line."""
    # Execute
    with pytest.raises(ConfigError) as info:
        parse_config(flat)

    # Assert
    assert isinstance(info.value, FedllmError)
    message = str(info.value)
    assert message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# Round trip and hash
# --------------------------------------------------------------------------------------------


def test_to_flat_round_trips_through_parse_config() -> None:
    """`parse_config(cfg.to_flat())` rebuilds the same config, defaults and overrides alike."""
    # Prepare
    default = parse_config({})
    custom = parse_config(
        {
            "run.rounds": 7,
            "lora.rank": 4,
            "lora.ffa": False,
            "privacy.noise-multiplier": 1.1,
            "privacy.accountant": "rdp",
            "strategy.name": "fedyogi",
            "data.partitioner": "dirichlet",
        }
    )

    # Execute
    default_again = parse_config(default.to_flat())
    custom_again = parse_config(custom.to_flat())

    # Assert
    assert default_again == default
    assert custom_again == custom
    assert set(custom.to_flat()) == set(known_keys())


def test_config_hash_is_stable_and_order_independent() -> None:
    """The same settings, given in any key order, hash to the same 64-hex-digit digest."""
    # Prepare
    a = parse_config({"lora.rank": 4, "run.rounds": 5})
    b = parse_config({"run.rounds": 5, "lora.rank": 4})

    # Execute
    digest_a, digest_b, digest_a_again = config_hash(a), config_hash(b), config_hash(a)

    # Assert
    assert re.fullmatch(r"[0-9a-f]{64}", digest_a)
    assert digest_a == digest_b == digest_a_again


def test_config_hash_changes_when_a_value_changes() -> None:
    """Changing one value (even a float by a little) changes the hash."""
    # Prepare
    base = parse_config({})
    changed = parse_config({"privacy.noise-multiplier": 0.81})

    # Execute / Assert
    assert config_hash(changed) != config_hash(base)
    assert config_hash(parse_config({"lora.ffa": False})) != config_hash(base)


# --------------------------------------------------------------------------------------------
# Flower's defaults in pyproject.toml
# --------------------------------------------------------------------------------------------


def test_pyproject_keys_are_all_known_keys() -> None:
    """Every key in `[tool.flwr.app.config]` is a key `parse_config` accepts."""
    # Prepare
    flower = _flower_defaults()

    # Execute
    unknown = sorted(set(flower) - set(known_keys()))

    # Assert
    assert flower
    assert unknown == []


def test_every_known_key_is_in_pyproject() -> None:
    """Every accepted key has a Flower default, so `--run-config` can override it."""
    # Prepare
    flower = _flower_defaults()

    # Execute
    missing = sorted(set(known_keys()) - set(flower))

    # Assert
    assert missing == []


def test_pyproject_defaults_equal_the_code_defaults() -> None:
    """Flower's defaults and the dataclass defaults never drift (value and type)."""
    # Prepare
    flower = _flower_defaults()
    code = FedllmConfig().to_flat()

    # Execute
    drift = {
        key: (value, code.get(key))
        for key, value in flower.items()
        if key not in code or code[key] != value or type(code[key]) is not type(value)
    }

    # Assert
    assert drift == {}
    assert parse_config(flower) == FedllmConfig()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.learning-rate", float("inf")),
        ("privacy.max-grad-norm", float("nan")),
        ("strategy.server-momentum", 1.0),
        ("strategy.tau", 0.0),
    ],
)
def test_non_finite_and_out_of_range_server_settings_are_refused(key: str, value: float) -> None:
    """Infinite/NaN numbers and server optimiser settings outside their range name the key."""
    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        parse_config({key: value})


@pytest.mark.parametrize(
    "preset",
    sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
    ids=str,
)
def test_every_preset_parses_as_flower_reads_it(preset: pathlib.Path) -> None:
    """Each file in configs/ goes through Flower's own `--run-config` reader and then
    `parse_config` over the defaults, so a preset can never ship with a bad key."""
    # Prepare
    from flwr.common.config import parse_config_args

    flat = parse_config_args([str(preset)])

    # Execute
    cfg = parse_config({**_flower_defaults(), **flat})

    # Assert
    assert flat
    assert cfg.to_flat()[next(iter(flat))] == next(iter(flat.values()))
