"""A site runs on its own copy of the base model, and only when the run's `model.fingerprint`
says that copy is the run's model (`fedllm.model_fingerprint`, `fedllm.site_model`).

The app tests drive the site's real ClientApp (`clients.app.create_app`, every mod) with
one train or evaluate message and the tiny model: no simulation, no SuperLink.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from clients.app import create_app
from fedllm import model_fingerprint as mf
from fedllm import site as site_module
from fedllm import wire
from fedllm.cli import main as cli_main
from fedllm.config import ModelConfig, parse_config, stable_dict
from fedllm.errors import ConfigError
from fedllm.model import adapter_spec, init_adapter, site_model_config, tokenizer_for
from fedllm.model_fingerprint import model_fingerprint, run_model_fingerprint
from fedllm.mods.context import local_model
from fedllm.site_model import model_refusal
from tests.test_mods import _message

# A hub id no site has: a site with its own copy must never need what the run names.
UNCACHED = "example-org/tiny-llama-not-cached"


def _copy(source: Path, target: Path) -> Path:
    """A copy with fresh file times (`shutil.copy` keeps no metadata)."""
    return Path(shutil.copytree(source, target, copy_function=shutil.copy))


def _flip_weight_byte(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # past the header: one weight's bits
    path.write_bytes(bytes(data))


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=4))


@pytest.fixture()
def copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return _copy(tiny_model_dir, tmp_path / "site-model")


# -- the fingerprint ----------------------------------------------------------------------------


def test_a_copy_elsewhere_with_other_file_times_has_the_same_fingerprint(
    tiny_model_dir: Path, copy: Path
) -> None:
    original = model_fingerprint(tiny_model_dir)
    assert model_fingerprint(copy) == original
    for path in copy.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert model_fingerprint(copy) == original
    assert len(original) == 64 and int(original, 16) >= 0


def test_one_changed_weight_byte_changes_the_fingerprint(tiny_model_dir: Path, copy: Path) -> None:
    size = (copy / "model.safetensors").stat().st_size
    _flip_weight_byte(copy)
    assert (copy / "model.safetensors").stat().st_size == size
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_a_weight_relevant_config_key_changes_the_fingerprint(
    tiny_model_dir: Path, copy: Path
) -> None:
    _edit_json(copy / "config.json", rms_norm_eps=1e-5)
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_where_and_by_what_a_copy_was_saved_does_not_change_the_fingerprint(
    tiny_model_dir: Path, copy: Path
) -> None:
    """`_name_or_path`, `transformers_version` and the saved dtype (transformers 4's
    `torch_dtype` or 5's `dtype`) are left out; so is indentation."""
    config = json.loads((copy / "config.json").read_text())
    config.pop("dtype", None)
    config.update(
        _name_or_path="/somewhere/else", transformers_version="4.0.0", torch_dtype="float32"
    )
    (copy / "config.json").write_text(json.dumps(config, indent=1))
    _edit_json(copy / "tokenizer_config.json", name_or_path="/elsewhere", is_local=True)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)


def test_another_tokenizer_or_chat_template_changes_the_fingerprint(
    tiny_model_dir: Path, copy: Path
) -> None:
    """The tokenizer decides what a training example is, so it is part of the model."""
    original = model_fingerprint(tiny_model_dir)
    template = copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("helpful", "harmful"))
    assert model_fingerprint(copy) != original
    template.write_text((tiny_model_dir / "chat_template.jinja").read_text())
    assert model_fingerprint(copy) == original
    _edit_json(copy / "tokenizer_config.json", pad_token="<|im_end|>")
    assert model_fingerprint(copy) != original


def test_a_process_hashes_an_unchanged_model_once(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real = mf._file_digest
    monkeypatch.setattr(mf, "_file_digest", lambda path: hashed.append(path) or real(path))
    first = model_fingerprint(copy)
    once = len(hashed)
    assert copy / "model.safetensors" in hashed
    assert model_fingerprint(copy) == first and len(hashed) == once  # nothing read again
    _flip_weight_byte(copy)  # a rewritten file: new mtime and ctime
    assert model_fingerprint(copy) != first and len(hashed) == 2 * once


def test_the_cli_prints_the_fingerprint_to_set(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["model", "fingerprint", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == model_fingerprint(copy)


def test_the_cli_names_a_hub_model_it_cannot_fingerprint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["model", "fingerprint", UNCACHED]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


# -- the run config and the node config ---------------------------------------------------------


def test_model_fingerprint_must_be_a_sha256_and_its_default_keeps_older_config_hashes() -> None:
    with pytest.raises(ConfigError, match=r"'model.fingerprint' = 'abc' is invalid"):
        parse_config({"model.fingerprint": "abc"})
    assert "fingerprint" not in stable_dict(parse_config({}))["model"]
    assert stable_dict(parse_config({"model.fingerprint": "a" * 64}))["model"]["fingerprint"]


def test_the_node_config_names_the_sites_own_model() -> None:
    assert local_model(Context(1, 7, {"model": "/srv/model"}, RecordDict(), {})) == "/srv/model"
    assert local_model(Context(1, 7, {"partition-id": 0}, RecordDict(), {})) is None


def test_the_sites_own_copy_gives_the_tokenizer_whatever_the_run_names(copy: Path) -> None:
    cfg = parse_config({"model.name": UNCACHED})
    tok = tokenizer_for(cfg, str(copy))
    assert Path(tok.name_or_path) == copy


def test_the_site_data_memo_tells_two_own_models_apart(
    tiny_model_dir: Path, copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str | None] = []
    monkeypatch.setattr(site_module, "tokenizer_for", lambda cfg, base_model=None: base_model)
    monkeypatch.setattr(
        site_module, "load_site_data", lambda cfg, *, tokenizer, **kw: loads.append(tokenizer)
    )
    monkeypatch.setattr(site_module, "_SITE_DATA", {})
    cfg = parse_config({"model.name": UNCACHED})
    for base in (str(tiny_model_dir), str(copy), str(tiny_model_dir)):
        assert site_module.site_data_for(cfg, site=0, num_sites=2, base_model=base)[1] == base
    assert loads == [str(tiny_model_dir), str(copy)]


# -- the rule -----------------------------------------------------------------------------------


def test_the_runs_own_model_is_checked_only_when_the_run_names_a_fingerprint(
    tiny_model_dir: Path,
) -> None:
    fp = model_fingerprint(tiny_model_dir)
    name = str(tiny_model_dir)
    assert model_refusal(parse_config({"model.name": name}), None) == ""
    assert model_refusal(parse_config({"model.name": name, "model.fingerprint": fp}), None) == ""
    wrong = model_refusal(parse_config({"model.name": name, "model.fingerprint": "0" * 64}), None)
    assert "model.fingerprint = '" + "0" * 64 in wrong and fp in wrong


def test_a_cached_hub_model_is_checked_and_loaded_from_the_snapshot_it_was_checked_on(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id is fingerprinted in the site's Hugging Face cache, and the site then loads
    that snapshot, not whatever the hub would send after the check."""
    repo = tmp_path / "hub" / "models--example-org--tiny"
    snapshot = _copy(tiny_model_dir, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fp = model_fingerprint(tiny_model_dir)
    cfg = parse_config({"model.name": "example-org/tiny", "model.fingerprint": fp})
    assert run_model_fingerprint(cfg.model) == fp and model_refusal(cfg, None) == ""
    assert Path(site_model_config(cfg.model).name) == snapshot
    assert site_model_config(parse_config({"model.name": "example-org/tiny"}).model).name == (
        "example-org/tiny"  # no fingerprint: transformers resolves it, as before
    )


def test_a_fingerprint_for_a_hub_model_the_site_has_not_cached_is_refused() -> None:
    cfg = parse_config({"model.name": UNCACHED, "model.fingerprint": "0" * 64})
    reason = model_refusal(cfg, None)
    assert "not in this site's Hugging Face cache" in reason and "node config 'model'" in reason


def test_an_own_copy_that_is_not_a_model_is_refused_naming_the_node_config(
    tmp_path: Path,
) -> None:
    cfg = parse_config({"model.name": UNCACHED, "model.fingerprint": "0" * 64})
    reason = model_refusal(cfg, str(tmp_path / "absent"))
    assert "node config 'model'" in reason and "cannot be fingerprinted" in reason


# -- the site's ClientApp -----------------------------------------------------------------------


def _run(
    tmp_path: Path, own: Path, kind: str, **run: Any
) -> tuple[Message, Context, dict[str, Any]]:
    """One message through the site's app, with its own copy `own` and the run naming a hub
    model the site does not have."""
    overrides = {
        "model.name": UNCACHED,
        "run.name": "own-model",
        "run.output-dir": str(tmp_path / "runs"),
        "privacy.mode": "record",
        "train.local-steps": 1,
        "train.batch-size": 8,
        **run,
    }
    spec = adapter_spec(ModelConfig(name=str(own)), parse_config(overrides).lora)
    arrays = {n: a for n, a in init_adapter(spec, seed=0).items() if n in spec.sent}
    content = RecordDict(
        {
            wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1}),
            wire.ARRAYS: wire.arrays_to_record(arrays),
        }
    )
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "state")}
    context = Context(1, 7, {**node, "model": str(own)}, RecordDict(), {})
    reply = create_app(overrides)(_message(content, kind), context)
    assert not reply.has_error(), reply.error
    return reply, context, overrides


def _nothing_written(tmp_path: Path, context: Context) -> None:
    assert not (tmp_path / "state").exists() and not (tmp_path / "runs").exists()
    assert list(context.state.keys()) == []


def test_a_site_whose_own_copy_matches_the_runs_fingerprint_trains_on_it(
    tiny_model_dir: Path, copy: Path, tmp_path: Path
) -> None:
    reply, _, _ = _run(
        tmp_path, copy, MessageType.TRAIN, **{"model.fingerprint": model_fingerprint(copy)}
    )
    assert wire.refusal_reason(reply.content) is None
    assert reply.content[wire.METRICS][wire.EPSILON] > 0
    assert len(reply.content[wire.ARRAYS]) > 0


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_site_whose_own_copy_is_another_model_refuses_before_reading_anything(
    tiny_model_dir: Path, copy: Path, tmp_path: Path, kind: str
) -> None:
    _flip_weight_byte(copy)
    run_fp = model_fingerprint(tiny_model_dir)
    reply, context, _ = _run(tmp_path, copy, kind, **{"model.fingerprint": run_fp})
    reason = str(wire.refusal_reason(reply.content))
    assert f"model.fingerprint = '{run_fp}'" in reason and "own copy" in reason
    assert model_fingerprint(copy) in reason
    _nothing_written(tmp_path, context)


@pytest.mark.parametrize("kind", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_site_with_its_own_copy_refuses_a_run_without_a_fingerprint_naming_the_value(
    copy: Path, tmp_path: Path, kind: str
) -> None:
    reply, context, _ = _run(tmp_path, copy, kind)
    reason = str(wire.refusal_reason(reply.content))
    assert "sets no model.fingerprint" in reason
    assert f'set model.fingerprint = "{model_fingerprint(copy)}"' in reason
    _nothing_written(tmp_path, context)
