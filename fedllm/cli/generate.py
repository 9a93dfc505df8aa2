"""`fedllm generate`: answer a prompt with a run's base model and its trained adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.cli.common import AT_REST_HELP, at_rest_key, load_run, run_config
from fedllm.errors import RunDirError
from fedllm.secure.at_rest import SUFFIX, stored_file

__all__ = ["add_parsers"]


def cmd_generate(args: argparse.Namespace) -> int:
    # heavy: torch and fedllm.model take ~6 s to import; keeps `fedllm --help` fast
    import torch

    from fedllm.model import (  # heavy: torch
        ADAPTER_FILE,
        load_base_model,
        load_peft_model,
        load_tokenizer,
        pick_device,
        resolve_model_dir,
    )

    path, config, summary = load_run(args.run)
    cfg = run_config(config)
    ckpt = args.adapter or summary.get("adapter", {}).get("final_checkpoint")
    if not ckpt or not Path(ckpt).is_dir():
        raise RunDirError(f"run {path} has no adapter checkpoint; train at least one round.")
    stored = stored_file(Path(ckpt) / ADAPTER_FILE)
    if stored is None:
        raise RunDirError(
            f"{ckpt} holds no peft adapter (an HE run's adapter is CKKS-encrypted): decrypt it "
            f"at a site with `fedllm he decrypt {args.run} --out DIR`, then pass --adapter DIR."
        )
    # The run's own checkpoint is opened strictly under the run's key; an --adapter directory
    # is taken as it is, and needs a key only if it is sealed.
    sealed = stored.name.endswith(SUFFIX)
    key = at_rest_key(args, path) if sealed or not args.adapter else None
    device = pick_device(args.device, setting="--device")
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model), cfg.model)
    model = load_peft_model(load_base_model(cfg.model, device), Path(ckpt), at_rest=key)
    model.eval()
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = {k: v.to(device) for k, v in ids.items()}
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return 0


def add_parsers(sub: Any) -> None:
    """`generate`."""
    gen = sub.add_parser("generate", help="answer a prompt with the base model + final adapter")
    gen.add_argument("prompt")
    gen.add_argument("--run", required=True, help="outputs/<run-name>")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    gen.add_argument("--adapter", help="a peft adapter directory instead of the run's last")
    gen.add_argument("--at-rest-key", help=AT_REST_HELP)
    gen.set_defaults(func=cmd_generate)
