"""Benchmark: one DP-SGD step vs one plain step, same model, adapter and batch, side by side.

Usage::

    python benchmarks/dp_step.py [--batch 32] [--repeats 3] [--out benchmarks/results/dp_step.json]

Steps alternate A B B A (plain, DP, DP, plain, ...) after a warm-up of each, so drift in
machine load hits both alike; the ratio of medians is reported. Defaults to the embedded model
(SmolLM2-135M-Instruct) and its chatterbot data at one site. Also records how long the base
model takes to load from its prepared safetensors copy (`fedllm model prepare`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import BenchmarkRun, abba  # noqa: E402
from fedllm.config import parse_config  # noqa: E402
from fedllm.model import attach_lora, load_base_model, pick_device  # noqa: E402
from fedllm.privacy.dpsgd import DPSettings  # noqa: E402
from fedllm.site import load_site_data, tokenizer_for  # noqa: E402
from fedllm.train import train_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--physical-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="extra config as key=value")
    parser.add_argument("--out", default="benchmarks/results/dp_step.json")
    args = parser.parse_args()
    run = BenchmarkRun("dp_step")

    overrides: dict[str, object] = {
        "train.local-steps": 1,
        "train.batch-size": args.batch,
        "train.physical-batch-size": args.physical_batch,
    }
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value) if value[:1] in "0123456789-tf[" else value
    cfg = parse_config(overrides)
    device = pick_device(cfg.train.device)
    tok = tokenizer_for(cfg)
    data = load_site_data(cfg, site=0, num_sites=3, tokenizer=tok)
    t = time.perf_counter()
    base = load_base_model(cfg.model, device)
    load_seconds = time.perf_counter() - t
    model = attach_lora(base, cfg.lora, seed=0)
    n = len(data.train)
    # Same batch for both: sample rate 1 over exactly `batch` examples (Poisson with q=1
    # includes every example), so DP and plain see identical inputs.
    features = data.train[: args.batch]
    dp = DPSettings(
        noise_multiplier=cfg.privacy.noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        sample_rate=1.0,
        expected_batch_size=args.batch,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
    )
    tcfg = cfg.train
    tcfg.batch_size = args.batch

    def step(with_dp: bool) -> float:
        t = time.perf_counter()
        train_local(
            model,
            features,
            cfg=tcfg,
            pad_token_id=int(tok.pad_token_id),
            device=device,
            dp=dp if with_dp else None,
            seed=0,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step(False)
    step(True)  # warm-up
    plain, private = [], []
    for _, side in abba(args.repeats):
        (plain if side == "A" else private).append(step(side == "B"))
    result = {
        "what": "one optimizer step on the same batch: Opacus DP-SGD vs plain",
        "model": cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "modules": cfg.lora.modules, "ffa": cfg.lora.ffa},
        "batch": args.batch,
        "physical_batch": args.physical_batch,
        "grad_sample_mode": cfg.privacy.grad_sample_mode,
        "site_examples": n,
        "mean_tokens": statistics.mean(len(f["input_ids"]) for f in features),
        "plain_seconds": plain,
        "dp_seconds": private,
        "plain_median_s": statistics.median(plain),
        "dp_median_s": statistics.median(private),
        "ratio_dp_over_plain": statistics.median(private) / statistics.median(plain),
        "target_ratio": 1.5,
        "order": "A B B A (A plain, B DP), after one warm-up step of each",
        "base_model_load_seconds": load_seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    run.write(args.out, result)
    print(
        json.dumps({k: result[k] for k in ("plain_median_s", "dp_median_s", "ratio_dp_over_plain")})
    )


if __name__ == "__main__":
    main()
