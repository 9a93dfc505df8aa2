"""The CUDA-only code paths (issue 19): bf16 by default and 4/8-bit base weights on a GPU;
on a machine without CUDA the requests that need one fail with one line, never a silent
fallback. The GPU tests skip cleanly where no CUDA device (or bitsandbytes) is present."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedllm.config import parse_config
from fedllm.errors import ConfigError
from fedllm.model import attach_lora, get_adapter_arrays, load_base_model, pick_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_asking_for_cuda_without_one_is_one_line_not_a_fallback() -> None:
    with pytest.raises(ConfigError, match="'train.device' = 'cuda' but no CUDA device"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_quantised_base_weights_without_cuda_are_refused_by_name(tiny_model_dir: Path) -> None:
    cfg = parse_config({"model.name": str(tiny_model_dir), "model.quantization": "4bit"})
    with pytest.raises(ConfigError, match="'model.quantization' = '4bit' needs a CUDA device"):
        load_base_model(cfg.model, torch.device("cpu"))


@needs_cuda
def test_on_cuda_the_base_model_loads_in_bf16_and_the_adapter_trains(
    tiny_model_dir: Path,
) -> None:
    # Prepare
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    device = pick_device("auto")
    # Execute
    model = attach_lora(load_base_model(cfg.model, device), cfg.lora, seed=0)
    ids = torch.randint(0, 100, (2, 8), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # Assert
    assert device.type == "cuda"
    assert next(p for p in model.parameters() if not p.requires_grad).dtype == torch.bfloat16
    assert all(
        p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n
    )
    assert get_adapter_arrays(model)


@needs_cuda
@needs_bnb
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_on_cuda_quantised_base_weights_load_and_a_lora_step_runs(
    bits: str, tiny_model_dir: Path
) -> None:
    # Prepare
    cfg = parse_config({"model.name": str(tiny_model_dir), "model.quantization": bits})
    device = pick_device("cuda")
    # Execute
    model = attach_lora(load_base_model(cfg.model, device), cfg.lora, seed=0)
    ids = torch.randint(0, 100, (2, 8), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    # Assert
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
