"""Benchmark: one DP-SGD step vs one plain step, same model, adapter and batch, for every
Opacus 1.6 grad-sample mode that computes per-sample gradients of a peft LoRA adapter.

Usage::

    python benchmarks/dp_step.py [--batch 32] [--repeats 3] [--modes hooks,functorch,ew]

The modes (checked on a tiny peft LoRA Llama with Opacus 1.6: each gives per-sample
gradients equal to the hooks mode's, padding and attention mask included):

- ``hooks`` and ``functorch``: fedllm's own training step (`fedllm.train.train_local`), hooks
  attached in place (``privacy.grad-sample-mode``);
- ``ew`` (expanded weights): Opacus only offers it as a wrapping module, which fedllm does not
  use (parameter names would gain ``_module.``), so its step is written here with the same
  micro-batches, loss, optimizer and `DPOptimizer`.

Opacus' ``ghost`` mode is not measured: it computes per-sample gradient norms, not gradients,
and needs Opacus' own loss wrapper (ghost clipping), a different training loop.

Steps rotate plain, hooks, functorch, ew, ew, functorch, hooks, plain, ... after a warm-up of
each, so drift in machine load weighs on every side alike; the ratio of medians is reported.
Defaults to the embedded model (SmolLM2-135M-Instruct) and its chatterbot data at one site.
Also records how long the base model takes to load from its prepared safetensors copy
(`fedllm model prepare`).
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

from benchmarks.provenance import BenchmarkRun, rotation  # noqa: E402
from fedllm.config import TrainConfig, parse_config  # noqa: E402
from fedllm.data import collate_batch  # noqa: E402
from fedllm.model import attach_lora, load_base_model, pick_device  # noqa: E402
from fedllm.privacy.dpsgd import DPSettings, detach_dp  # noqa: E402
from fedllm.site import load_site_data, tokenizer_for  # noqa: E402
from fedllm.train import Features, per_example_loss, train_local  # noqa: E402

MODES = ("hooks", "functorch", "ew")
FEDLLM_MODES = ("hooks", "functorch")  # the modes fedllm's own step attaches in place


def ew_step(
    model: torch.nn.Module,
    features: Features,
    *,
    cfg: TrainConfig,
    dp: DPSettings,
    pad_token_id: int,
    device: torch.device,
) -> None:
    """One DP-SGD step with Opacus' expanded-weights module: fedllm's micro-batches, loss
    and optimizer (`fedllm.train._accumulate`), so only the per-sample gradients differ."""
    # heavy: opacus takes ~10 s to import, and only this side needs its wrapping module
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    inner = (
        torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd"
        else torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    )
    optimizer = DPOptimizer(
        inner,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.expected_batch_size,
        loss_reduction="mean",
    )
    wrapped = wrap_model(model, grad_sample_mode="ew", batch_first=True, loss_reduction="mean")
    model.train()
    size = cfg.physical_batch_size
    micro = [features[i : i + size] for i in range(0, len(features), size)]
    try:
        optimizer.zero_grad()
        for i, chunk in enumerate(micro):
            batch = {
                k: v.to(device)
                for k, v in collate_batch(list(chunk), pad_token_id=pad_token_id).items()
            }
            logits = wrapped(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example_loss(logits, batch["labels"]).mean().backward()
            optimizer.signal_skip_step(do_skip=i < len(micro) - 1)
            optimizer.step()
            if i < len(micro) - 1:
                optimizer.zero_grad()
    finally:
        optimizer.zero_grad()
        detach_dp(model, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--physical-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"grad-sample modes, comma-separated {MODES}"
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra config as key=value")
    parser.add_argument("--out", default="benchmarks/results/dp_step.json")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"--modes: unknown grad-sample mode(s) {unknown}; known: {MODES}.")
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
    tcfg = cfg.train
    tcfg.batch_size = args.batch

    def settings(mode: str) -> DPSettings:
        return DPSettings(
            noise_multiplier=cfg.privacy.noise_multiplier,
            max_grad_norm=cfg.privacy.max_grad_norm,
            sample_rate=1.0,
            expected_batch_size=args.batch,
            grad_sample_mode=mode,
        )

    def step(side: str) -> float:
        t = time.perf_counter()
        if side == "ew":
            ew_step(
                model,
                features,
                cfg=tcfg,
                dp=settings(side),
                pad_token_id=int(tok.pad_token_id),
                device=device,
            )
        else:
            train_local(
                model,
                features,
                cfg=tcfg,
                pad_token_id=int(tok.pad_token_id),
                device=device,
                dp=None if side == "plain" else settings(side),
                seed=0,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    sides = ["plain"]
    failed: dict[str, str] = {}
    for side in ["plain", *modes]:  # warm-up of each; a mode that fails is recorded, not run
        try:
            step(side)
        except Exception as e:  # noqa: BLE001 - the failure is the finding for this mode
            if side == "plain":
                raise
            failed[side] = f"{type(e).__name__}: {e}"
            continue
        if side != "plain":
            sides.append(side)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for _, side in rotation(sides, args.repeats):
        seconds[side].append(step(side))
    plain = seconds["plain"]
    per_mode: dict[str, dict[str, object]] = {}
    for mode in modes:
        entry: dict[str, object] = {"in_fedllm": mode in FEDLLM_MODES}
        if mode in failed:
            entry["error"] = failed[mode]
        else:
            entry["dp_seconds"] = seconds[mode]
            entry["dp_median_s"] = statistics.median(seconds[mode])
            entry["ratio_dp_over_plain"] = statistics.median(seconds[mode]) / statistics.median(
                plain
            )
        per_mode[mode] = entry
    default_mode = cfg.privacy.grad_sample_mode
    default = per_mode.get(default_mode, {})
    result = {
        "what": "one optimizer step on the same batch: Opacus DP-SGD, per grad-sample mode, "
        "vs plain",
        "model": cfg.model.name,
        "lora": {"rank": cfg.lora.rank, "modules": cfg.lora.modules, "ffa": cfg.lora.ffa},
        "batch": args.batch,
        "physical_batch": args.physical_batch,
        "site_examples": n,
        "mean_tokens": statistics.mean(len(f["input_ids"]) for f in features),
        "plain_seconds": plain,
        "plain_median_s": statistics.median(plain),
        "modes": per_mode,
        "modes_not_measured": {
            "ghost": "per-sample gradient norms only (ghost clipping), with Opacus' own loss "
            "wrapper: a different training loop, not used by fedllm"
        },
        # fedllm's default mode, under the keys earlier results used
        "grad_sample_mode": default_mode,
        "dp_seconds": default.get("dp_seconds"),
        "dp_median_s": default.get("dp_median_s"),
        "ratio_dp_over_plain": default.get("ratio_dp_over_plain"),
        "target_ratio": 1.5,
        "order": f"{' '.join(sides)} then reversed, {args.repeats} passes, after a warm-up of each",
        "base_model_load_seconds": load_seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    run.write(args.out, result)
    print(
        json.dumps({m: e.get("ratio_dp_over_plain", e.get("error")) for m, e in per_mode.items()})
    )


if __name__ == "__main__":
    main()
