"""Tests for fedllm.model: LoRA attachment, FFA-LoRA, adapter arrays and peft checkpoints."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedllm.config import LoraConfig, ModelConfig
from fedllm.errors import ConfigError, InvalidUpdateError, ModelError
from fedllm.model import (
    adapter_spec,
    attach_lora,
    get_adapter_arrays,
    init_adapter,
    load_base_model,
    save_peft_adapter,
    set_adapter_arrays,
)

CPU = torch.device("cpu")
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def model_cfg(tiny_model_dir: pathlib.Path) -> ModelConfig:
    """Point `model.name` at the tiny offline Llama."""
    return ModelConfig(name=str(tiny_model_dir))


@pytest.fixture
def make_model(model_cfg: ModelConfig) -> Callable[..., torch.nn.Module]:
    """Return a factory: a freshly loaded tiny base model with LoRA attached."""

    def make(lora: LoraConfig | None = None, seed: int = 0) -> torch.nn.Module:
        return attach_lora(load_base_model(model_cfg, CPU), lora or LoraConfig(), seed=seed)

    return make


def _copy(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Tests edit arrays in place: keep those edits off whatever get_adapter_arrays returned.
    return {name: np.array(value, copy=True) for name, value in arrays.items()}


def _lora_params(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{kind}." in n}


# --------------------------------------------------------------------------------------------
# Adapter arrays
# --------------------------------------------------------------------------------------------


def test_adapter_arrays_round_trip(make_model: Callable[..., torch.nn.Module]) -> None:
    """get -> perturb -> set -> get gives back exactly the perturbed arrays."""
    # Prepare
    model = make_model()
    rng = np.random.default_rng(0)
    sent = {
        n: (a + rng.normal(size=a.shape)).astype(np.float32)
        for n, a in _copy(get_adapter_arrays(model)).items()
    }

    # Execute
    set_adapter_arrays(model, sent)
    received = get_adapter_arrays(model)

    # Assert
    assert list(received) == list(sent)
    for name, value in sent.items():
        assert received[name].dtype == np.float32
        np.testing.assert_array_equal(received[name], value)


def test_adapter_arrays_are_copies(make_model: Callable[..., torch.nn.Module]) -> None:
    """Editing the returned arrays in place never changes the model's parameters."""
    # Prepare
    model = make_model()
    arrays = get_adapter_arrays(model)

    # Execute
    for value in arrays.values():
        value += 1.0

    # Assert
    for name, value in get_adapter_arrays(model).items():
        assert not value.any(), name  # B is still its initial zeros


def test_adapter_array_names_are_lora_only(
    make_model: Callable[..., torch.nn.Module], model_cfg: ModelConfig
) -> None:
    """No base-model weight name is ever among the arrays a site sends (plain LoRA or FFA)."""
    # Prepare
    base_names = {n for n, _ in load_base_model(model_cfg, CPU).named_parameters()}

    # Execute
    ffa_names = list(get_adapter_arrays(make_model(LoraConfig(ffa=True))))
    plain_names = list(
        get_adapter_arrays(
            make_model(
                LoraConfig(ffa=False, target_modules="q_proj,k_proj,o_proj,up_proj,down_proj")
            )
        )
    )

    # Assert
    for names in (ffa_names, plain_names):
        assert names
        assert all(".lora_" in n for n in names)
        assert not {n.removeprefix("base_model.model.") for n in names} & base_names


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", f"adapter arrays do not match the model: missing ['{V_B}']."),
        (
            "extra",
            "adapter arrays do not match the model: unexpected ['model.embed_tokens.weight'].",
        ),
        ("shape", f"adapter array '{Q_B}' has shape (8, 32), expected (32, 8)."),
        ("nan", f"adapter array '{Q_B}' holds NaN or infinite values."),
        ("inf", f"adapter array '{Q_B}' holds NaN or infinite values."),
    ],
)
def test_set_adapter_arrays_refuses_a_bad_update(
    make_model: Callable[..., torch.nn.Module], edit: str, message: str
) -> None:
    """A missing, extra, misshapen or non-finite tensor is refused, naming the tensor."""
    # Prepare
    model = make_model()
    arrays = _copy(get_adapter_arrays(model))
    if edit == "missing":
        del arrays[V_B]
    elif edit == "extra":
        arrays["model.embed_tokens.weight"] = np.zeros((600, 32), dtype=np.float32)
    elif edit == "shape":
        arrays[Q_B] = arrays[Q_B].T.copy()
    else:
        arrays[Q_B][0, 0] = np.nan if edit == "nan" else np.inf

    # Execute / Assert
    with pytest.raises(InvalidUpdateError, match=re.escape(message)):
        set_adapter_arrays(model, arrays)


def test_refused_update_leaves_the_model_unchanged(
    make_model: Callable[..., torch.nn.Module],
) -> None:
    """An update refused for a NaN in a late tensor changes no parameter of the model."""
    # Prepare
    model = make_model()
    before = _copy(get_adapter_arrays(model))
    update = {n: np.full_like(a, 0.5) for n, a in before.items()}
    update[V_B][0, 0] = np.nan  # the last tensor in parameter order

    # Execute
    with pytest.raises(InvalidUpdateError):
        set_adapter_arrays(model, update)

    # Assert
    after = get_adapter_arrays(model)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


# --------------------------------------------------------------------------------------------
# FFA-LoRA and plain LoRA
# --------------------------------------------------------------------------------------------


def test_ffa_trains_and_sends_only_b(make_model: Callable[..., torch.nn.Module]) -> None:
    """With FFA-LoRA only the four lora_B tensors are trainable and sent; A is frozen."""
    # Execute
    model = make_model(LoraConfig(ffa=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    sent = list(get_adapter_arrays(model))

    # Assert
    assert len(sent) == 4
    assert all(".lora_B." in n for n in sent)
    assert all(".lora_B." in n for n in trainable)
    assert len(trainable) == 4
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


def test_ffa_a_is_shared_by_seed(make_model: Callable[..., torch.nn.Module]) -> None:
    """Two independent loads with one seed get identical A; another seed gets a different A."""
    # Execute
    a_first = _lora_params(make_model(LoraConfig(ffa=True), seed=0), "lora_A")
    a_second = _lora_params(make_model(LoraConfig(ffa=True), seed=0), "lora_A")
    a_other = _lora_params(make_model(LoraConfig(ffa=True), seed=1), "lora_A")

    # Assert
    assert len(a_first) == 4
    for name, value in a_first.items():
        assert torch.equal(value, a_second[name])
        assert not torch.equal(value, a_other[name])


def test_plain_lora_sends_a_and_b(make_model: Callable[..., torch.nn.Module]) -> None:
    """Without FFA both factors of each adapted layer are trainable and sent."""
    # Execute
    sent = list(get_adapter_arrays(make_model(LoraConfig(ffa=False))))

    # Assert
    assert len(sent) == 8
    assert sum(".lora_A." in n for n in sent) == 4
    assert sum(".lora_B." in n for n in sent) == 4
    assert Q_A in sent
    assert Q_B in sent


# --------------------------------------------------------------------------------------------
# Specs and the shared initial adapter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffa", [True, False])
def test_adapter_spec_matches_an_attached_model(
    make_model: Callable[..., torch.nn.Module], model_cfg: ModelConfig, ffa: bool
) -> None:
    """The meta-device spec has the names and shapes of a real model with LoRA attached."""
    # Prepare
    lora = LoraConfig(ffa=ffa, rank=4, target_modules="q_proj,v_proj,down_proj")
    model = make_model(lora)
    real_shapes = {
        n.replace(".default.", "."): tuple(p.shape)
        for n, p in model.named_parameters()
        if ".lora_" in n
    }

    # Execute
    spec = adapter_spec(model_cfg, lora)

    # Assert
    assert spec.shapes == real_shapes
    assert spec.sent == tuple(get_adapter_arrays(model))
    assert {n: spec.shapes[n] for n in spec.sent} == {
        n: a.shape for n, a in get_adapter_arrays(model).items()
    }
    assert spec.shapes[Q_A] == (4, 32)
    assert spec.shapes[Q_B] == (32, 4)


def test_init_adapter_is_deterministic_with_zero_b(model_cfg: ModelConfig) -> None:
    """The initial adapter is a pure function of the seed: A uniform in ±1/sqrt(fan_in), B = 0."""
    # Prepare
    spec = adapter_spec(model_cfg, LoraConfig())

    # Execute
    first = init_adapter(spec, seed=0)
    second = init_adapter(spec, seed=0)
    other = init_adapter(spec, seed=1)

    # Assert
    assert list(first) == list(spec.shapes)
    for name, value in first.items():
        assert value.dtype == np.float32
        assert value.shape == spec.shapes[name]
        np.testing.assert_array_equal(value, second[name])
        if ".lora_B." in name:
            assert not value.any()
        else:
            assert np.abs(value).max() <= 1 / np.sqrt(value.shape[1])
            assert np.abs(value).max() > 0
            assert not np.array_equal(value, other[name])


def test_attach_lora_uses_init_adapter(
    make_model: Callable[..., torch.nn.Module], model_cfg: ModelConfig
) -> None:
    """The A factors a site attaches are the ones the server derives from the spec alone."""
    # Prepare
    expected = init_adapter(adapter_spec(model_cfg, LoraConfig()), seed=3)

    # Execute
    model = make_model(LoraConfig(), seed=3)

    # Assert
    for name, value in _lora_params(model, "lora_A").items():
        np.testing.assert_array_equal(value.numpy(), expected[name.replace(".default.", ".")])


# --------------------------------------------------------------------------------------------
# Configuration errors
# --------------------------------------------------------------------------------------------


def test_rank_larger_than_a_layer_is_a_config_error(
    make_model: Callable[..., torch.nn.Module], model_cfg: ModelConfig
) -> None:
    """Rank 17 on v_proj (16x32) names lora.rank and the limit 16, for sites and the server."""
    # Prepare
    lora = LoraConfig(rank=17)
    pattern = (
        r"config key 'lora\.rank' = 17 is larger than layer "
        r"'model\.layers\.0\.self_attn\.v_proj' \(16x32\); use lora\.rank <= 16\."
    )

    # Execute / Assert
    with pytest.raises(ConfigError, match=pattern):
        make_model(lora)
    with pytest.raises(ConfigError, match=pattern):
        adapter_spec(model_cfg, lora)


def test_unknown_target_module_lists_linear_layers(
    make_model: Callable[..., torch.nn.Module],
) -> None:
    """A target that is no linear layer is refused with the model's linear layer names."""
    # Execute / Assert
    with pytest.raises(
        ConfigError,
        match=(
            r"'lora\.target-modules' names 'qkv_proj', which is no linear layer of this model; "
            r"choose from: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
            r"v_proj\."
        ),
    ):
        make_model(LoraConfig(target_modules="q_proj,qkv_proj"))


def test_missing_local_model_dir_is_a_model_error(tmp_path: pathlib.Path) -> None:
    """A local path that does not exist is a `ModelError` naming the path, not a hub lookup."""
    # Prepare
    cfg = ModelConfig(name=str(tmp_path / "no-such-model"))

    # Execute / Assert
    with pytest.raises(ModelError, match=r"model directory .*no-such-model does not exist"):
        load_base_model(cfg, CPU)


def test_model_dir_without_config_is_a_model_error(tmp_path: pathlib.Path) -> None:
    """An existing directory with no config.json is refused before transformers sees it."""
    # Prepare
    cfg = ModelConfig(name=str(tmp_path))

    # Execute / Assert
    with pytest.raises(ModelError, match=r"has no config\.json"):
        load_base_model(cfg, CPU)


# --------------------------------------------------------------------------------------------
# peft checkpoints
# --------------------------------------------------------------------------------------------


def test_saved_adapter_loads_in_peft_with_the_same_weights(
    make_model: Callable[..., torch.nn.Module],
    model_cfg: ModelConfig,
    tmp_path: pathlib.Path,
) -> None:
    """`PeftModel.from_pretrained` loads the checkpoint with exactly the saved A and B."""
    # Prepare
    from peft import PeftModel

    lora = LoraConfig()
    full = init_adapter(adapter_spec(model_cfg, lora), seed=0)
    rng = np.random.default_rng(1)
    for name in full:
        if ".lora_B." in name:
            full[name] = rng.normal(size=full[name].shape).astype(np.float32)
    ours = make_model(lora, seed=0)
    set_adapter_arrays(ours, {n: full[n] for n in get_adapter_arrays(ours)})
    target = tmp_path / "adapter"

    # Execute
    save_peft_adapter(target, full, model_cfg=model_cfg, lora_cfg=lora)
    loaded = PeftModel.from_pretrained(load_base_model(model_cfg, CPU), str(target))

    # Assert
    assert (target / "adapter_config.json").is_file()
    assert (target / "adapter_model.safetensors").is_file()
    params = dict(loaded.named_parameters())
    for name in (Q_A, Q_B, V_B):
        value = params[name.replace(".weight", ".default.weight")].detach().numpy()
        np.testing.assert_array_equal(value, full[name])
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    ours.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
