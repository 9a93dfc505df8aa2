"""Fuzzed run configs (issue 18): flat keys as Flower hands them over, and run-config files
read by Flower's own `--run-config` reader, are either refused with one `ConfigError` line
naming a key, or parsed into exactly the config they ask for."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from hypothesis import example, given
from hypothesis import strategies as st

from fedllm.config import FedllmConfig, config_hash, known_keys, parse_config
from fedllm.errors import ConfigError
from fedllm.rundir import RunDir

REPO = pathlib.Path(__file__).resolve().parents[1]
KEYS = known_keys()
# Text as Flower's records (protobuf) and TOML files carry it: valid UTF-8, so no lone
# surrogates (which only code inside one process could build).
TEXT = st.text(st.characters(codec="utf-8"), max_size=24)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    TEXT,
    st.lists(st.integers(), max_size=3),
    st.binary(max_size=4),
)


def _of_its_type(key: str) -> st.SearchStrategy[Any]:
    """Values of the key's own type, in range and out of it (its choices among the texts)."""
    typ, f = KEYS[key]
    if typ is bool:
        return st.booleans()
    if typ is int:
        return st.one_of(
            st.integers(-3, 70_000), st.sampled_from([4096, 8192, 16384, 32768, 2**63])
        )
    if typ is float:
        return st.one_of(st.floats(), st.floats(-2, 2), st.sampled_from([0.0, 1e-5, 1e300]))
    fixed = list(f.metadata.get("choices") or ()) + [
        f.default,
        "60,60",
        "40,21",
        "0,0",
        "..",
        "a/b",
    ]
    return st.one_of(TEXT, st.sampled_from(fixed))


@st.composite
def flat_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A flat run config: known keys with values of their type or of any type, and now and
    then a key no section has."""
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), max_size=6, unique=True))
    flat = {k: draw(st.one_of(_of_its_type(k), _of_its_type(k), ANY_VALUE)) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        flat[draw(st.text(max_size=16))] = draw(ANY_VALUE)
    return flat


def _assert_configured_as_asked(cfg: FedllmConfig, flat: dict[str, Any]) -> None:
    """Every value set is the value configured, of its field's type and among its choices,
    and the config parses back into itself from its flat form."""
    resolved = cfg.to_flat()
    for key, value in flat.items():
        typ, f = KEYS[key]
        assert type(resolved[key]) is typ
        assert resolved[key] == (float(value) if typ is float else value)  # an int, rounded
        choices = f.metadata.get("choices")
        assert not choices or resolved[key] in choices
        assert typ is not float or math.isfinite(resolved[key])
    assert parse_config(resolved) == cfg
    assert len(config_hash(cfg)) == 64


def _assert_one_line_naming(error: ConfigError, keys: list[str]) -> None:
    """One line naming a key that was set, or the key it conflicts with (an HE chain too
    short for the default he.scale-bits names he.scale-bits)."""
    message = str(error)
    assert len(message.splitlines()) == 1, message
    assert any(k in message or repr(k) in message for k in [*keys, *KEYS]), message


def _parses_as_asked_or_is_refused(flat: dict[str, Any], asked: dict[str, Any]) -> None:
    """`flat` (the defaults and `asked`, or `asked` alone) parses to what `asked` sets, or
    is refused in one line naming a key."""
    try:
        cfg = parse_config(flat)
    except ConfigError as e:
        _assert_one_line_naming(e, list(asked))
        return
    _assert_configured_as_asked(cfg, asked)


@given(flat_configs())
@example({"\n": None})  # was two lines: the unknown key was quoted, not repr'd
@example({"lora.rank": True})
@example({"privacy.noise-multiplier": float("nan")})
@example({"he.coeff-mod-bit-sizes": "9" * 5000})
@example({"lora.alpha": 10**400})  # was OverflowError: an int past float's range
@example({"lora.rank": 10**5000})  # was accepted, then config_hash failed: too many digits
def test_a_fuzzed_flat_config_is_refused_in_one_line_or_parsed_as_asked(
    flat: dict[str, Any],
) -> None:
    """What `context.run_config` may hold: wrong types, values out of range or outside their
    choices, unknown keys."""
    _parses_as_asked_or_is_refused(flat, flat)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz-runs")


@given(TEXT | st.text(st.characters(codec="utf-8"), min_size=250, max_size=300))
@example("a\x00b")  # was accepted, then RunDir.create failed: ValueError, embedded null byte
@example("é" * 128)  # was accepted: 256 bytes, then OSError: File name too long
@example("..")
def test_an_accepted_run_name_is_a_directory_the_run_can_make(
    output_dir: pathlib.Path, name: str
) -> None:
    """The coordinator sends the run name to every site, which makes folders by it: a name
    parse_config accepts must be one the file system takes as a single directory."""
    try:
        cfg = parse_config({"run.name": name, "run.output-dir": str(output_dir)})
    except ConfigError as e:
        _assert_one_line_naming(e, ["run.name"])
        return
    run = RunDir.create(cfg, {"rounds_completed": 0})
    assert run.path.parent == output_dir.resolve()
    assert not name or run.path.name == name


def _toml_value(value: Any) -> str:
    """A TOML literal of `value` (JSON escapes control characters as TOML does; TOML wants
    DEL escaped too, and astral characters raw rather than as surrogate pairs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


@st.composite
def run_config_files(draw: st.DrawFn) -> dict[str, Any]:
    """What a `--run-config FILE.toml` holds: dotted keys (known ones, a bare key now and
    then) with booleans, TOML's 64-bit integers, floats or strings."""
    scalar = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), TEXT)
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=5, unique=True))
    table = {k: draw(st.one_of(_of_its_type(k).filter(lambda v: v != 2**63), scalar)) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        table[draw(st.from_regex(r"[a-z]{1,6}(\.[a-z-]{1,8})?", fullmatch=True))] = draw(scalar)
    return table


@given(run_config_files())
def test_a_fuzzed_run_config_file_is_refused_or_parsed_as_asked(
    output_dir: pathlib.Path, table: dict[str, Any]
) -> None:
    """The path `flwr run . --run-config FILE` takes: Flower reads the file and lays it over
    the app's defaults in pyproject.toml (refusing a key they lack), then the apps parse."""
    # Prepare
    path = output_dir / "run-config.toml"
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()), "utf-8")
    overrides = parse_config_args([str(path)])
    assert overrides == table or any(isinstance(v, float) and math.isnan(v) for v in table.values())
    try:
        fused = get_fused_config_from_dir(REPO, overrides)
    except ValueError as e:  # Flower's refusal of a key the app does not declare
        assert not set(overrides) <= set(KEYS), e
        return
    # Execute, Assert
    _parses_as_asked_or_is_refused(fused, overrides)
