"""`fedllm he decrypt`: a site's plaintext copy of an HE run's encrypted adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.cli.common import AT_REST_HELP, at_rest_key, load_run, run_config, verb_group
from fedllm.errors import RunDirError
from fedllm.rundir import RunDir

__all__ = ["add_parsers"]


def cmd_he_decrypt(args: argparse.Namespace) -> int:
    # heavy: fedllm.model and the HE site code import torch (~6 s); keeps `fedllm --help` fast
    from fedllm.model import save_peft_adapter
    from fedllm.secure.he_site import decrypt_adapter

    path, config, summary = load_run(args.run)
    cfg = run_config(config)
    if cfg.strategy.secure_aggregation != "he":
        raise RunDirError(f"run {path} did not aggregate under HE; its adapter is plaintext.")
    if args.checkpoint:
        ckpt = RunDir.at(path).checkpoint(args.checkpoint)
    else:
        ckpt = Path(summary.get("adapter", {}).get("final_checkpoint") or path / "none")
    key = at_rest_key(args, path)
    arrays, facts = decrypt_adapter(cfg, ckpt, args.context or cfg.he.site_context, at_rest=key)
    out = Path(args.out or f"{cfg.run.name}-{ckpt.name}-adapter")
    # Under an at-rest key the decrypted adapter is sealed too: never a silent plaintext copy.
    save_peft_adapter(out, arrays, model_cfg=cfg.model, lora_cfg=cfg.lora, at_rest=key)
    print(
        f"decrypted {ckpt} ({facts['ciphertexts']} ciphertexts, key {facts['key_id'][:12]}..., "
        f"total weight {facts['total_weight']:g}; every check slot verified)"
    )
    sealed = (
        f", sealed under at-rest key {key.id} (fedllm generate --adapter opens it)" if key else ""
    )
    print(f"peft adapter written to {out}{sealed}")
    return 0


def add_parsers(sub: Any) -> None:
    """`he decrypt`."""
    he = verb_group(sub, "he", "homomorphic aggregation")
    dec = he.add_parser("decrypt", help="decrypt an HE run's adapter (at a site) to peft format")
    dec.add_argument("run", help="outputs/<run-name> (a copy of the coordinator's run dir)")
    dec.add_argument("--context", help="the site's secret.context (default: he.site-context)")
    dec.add_argument("--checkpoint", help="round-N under checkpoints/ (default: the last)")
    dec.add_argument("--out", help="adapter directory (default: ./<run>-<round>-adapter)")
    dec.add_argument("--at-rest-key", help=AT_REST_HELP)
    dec.set_defaults(func=cmd_he_decrypt)
