"""Smaller updates: `python -m benchmarks.update_encoding`.

The quickstart (every key at its default: the embedded SmolLM2-135M-Instruct, 3 chatterbot
sites, 3 rounds, record-level DP-SGD) run three times in this one invocation, once per
`strategy.update-encoding` (fp32, fp16, int8 with blocks of `strategy.quantization-block`),
each with fedllm's real ServerApp and ClientApp, mods included (`tests/inprocess.py`: in
this process, without a SuperLink or Ray). For each: bytes the sites uploaded per round
(`summary.json` `bytes_per_round`, what the coordinator received: the encoded records) and
held-out loss per round, their ratios to fp32, and whether the targets hold (int8 uploads
at most 30% of fp32's bytes; final held-out loss within 1% of fp32's).

DP-SGD's noise and Poisson batches are drawn afresh in every run (fedllm never seeds them:
predictable batches would weaken the guarantee), so two fp32 runs differ too; to tell the
encoding's own error apart, a probe innermost on every site's train handler (it changes
nothing) encodes and decodes each real update both ways and records its relative L2 error.

Writes `benchmarks/results/update_encoding.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun, fresh_work  # noqa: E402

ENCODINGS = ("fp32", "fp16", "int8")
BYTES_TARGET = 0.30  # int8 uploads at most this share of fp32's
LOSS_TARGET = 0.01  # final held-out loss within this share of fp32's


class ErrorProbe:
    """Client mod, innermost on the train handler: the relative L2 error that fp16 and int8
    would put on this update (decoded minus trained, over the update's norm). Measures only:
    the reply leaves unchanged."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.errors: dict[str, list[float]] = {"fp16": [], "int8": []}

    def __call__(self, msg: Any, ctxt: Any, call_next: Any) -> Any:
        # heavy (Flower, the apps): imported once the benchmark runs
        from flwr.app import RecordDict

        from fedllm.wire import ARRAYS, decode_update, encode_update, record_to_arrays

        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content:
            return reply
        sent = record_to_arrays(msg.content[ARRAYS])
        trained = record_to_arrays(reply.content[ARRAYS])
        update = np.concatenate([(trained[n].astype(np.float64) - sent[n]).ravel() for n in sent])
        for scheme in self.errors:
            content = RecordDict({ARRAYS: reply.content[ARRAYS]})
            encode_update(content, sent, scheme=scheme, block=self.block)
            back = decode_update(content, sent, scheme=scheme, block=self.block)
            assert back is not None
            got = np.concatenate([(back[n].astype(np.float64) - sent[n]).ravel() for n in sent])
            norm = float(np.linalg.norm(update))
            self.errors[scheme].append(float(np.linalg.norm(got - update)) / max(norm, 1e-30))
        return reply


def one_run(work: Path, encoding: str, run: BenchmarkRun, extra: dict[str, Any]) -> dict[str, Any]:
    """The quickstart with `encoding` (and any `extra` keys): uploads and held-out loss
    from its summary."""
    # heavy (the apps, Flower, torch): imported once the benchmark runs
    from clients.app import create_app
    from fedllm.config import parse_config
    from tests.inprocess import run_in_process

    flat = {
        **extra,
        "run.name": encoding,
        "run.output-dir": str(work / "runs"),
        "strategy.update-encoding": encoding,
    }
    run_dir = work / "runs" / encoding
    if run_dir.exists():
        raise SystemExit(f"{run_dir} already exists; give a fresh --work directory.")
    probe = ErrorProbe(parse_config(flat).strategy.quantization_block)
    t0 = time.monotonic()
    run_in_process(flat, sites=3, client_app=create_app(flat, inner_mods=(probe,)))
    seconds = time.monotonic() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["status"] != "completed":
        raise SystemExit(f"run {encoding} did not complete ({summary.get('stop_reason')})")
    run.mark_made(run_dir)
    up = [b["up"] for b in summary["bytes_per_round"] if b["round"] > 0]
    out = {
        "update_encoding": summary.get("update_encoding"),
        "bytes_up_per_round": up,
        "bytes_up_per_site_per_round": [u // 3 for u in up],
        "bytes_down_per_round": [b["down"] for b in summary["bytes_per_round"]],
        "eval_loss": summary["eval_loss"],
        "final_eval_loss": summary["eval_loss"][-1],
        "rejected_updates": summary.get("rejected_updates"),
        "seconds": round(seconds, 1),
        "probe_relative_update_error": {
            k: {"max": max(v), "mean": float(np.mean(v)), "n": len(v)}
            for k, v in probe.errors.items()
            if v
        },
    }
    print(
        f"{encoding}: {seconds:.0f} s, up {up}, final loss {out['final_eval_loss']:.5f}",
        flush=True,
    )
    return out


def _key_value(item: str) -> tuple[str, Any]:
    """`KEY=VALUE`, the value read as JSON (a number, true/false) or else kept as text."""
    key, _, text = item.partition("=")
    try:
        return key, json.loads(text)
    except ValueError:
        return key, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="fresh working directory (default: a temporary one)")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "update_encoding.json")
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key laid over the defaults (a smoke test on a small model)",
    )
    args = parser.parse_args()
    run = BenchmarkRun("update_encoding")
    work = fresh_work(args.work, "fedllm-update-encoding-")
    # heavy: torch, only to set its thread count
    import torch

    torch.set_num_threads(args.threads)
    extra = dict(_key_value(item) for item in args.set)
    runs = {enc: one_run(work, enc, run, extra) for enc in ENCODINGS}
    base = runs["fp32"]
    for r in runs.values():
        r["bytes_up_ratio_to_fp32"] = round(
            sum(r["bytes_up_per_round"]) / sum(base["bytes_up_per_round"]), 4
        )
        r["final_eval_loss_ratio_to_fp32"] = round(
            r["final_eval_loss"] / base["final_eval_loss"], 5
        )
    int8 = runs["int8"]
    result = {
        "what": "bytes uploaded per round and held-out loss, fp32 vs fp16 vs int8 updates",
        "setup": "the quickstart: every key at its default (embedded SmolLM2-135M-Instruct, "
        "3 chatterbot sites by category, 3 rounds, record-level DP-SGD sigma 0.8, FFA-LoRA "
        "r 8 on q_proj,v_proj), strategy.update-encoding varied",
        "driver": "tests/inprocess.py: the real ServerApp and ClientApp, mods included, "
        "in one process (no SuperLink, no Ray)",
        "encoded": "each site's update (its adapter minus the round's global adapter), "
        "decoded at the coordinator before any stage uses it",
        "noise_note": "DP-SGD noise and batches are fresh in every run, so the loss "
        "differences include run-to-run noise; probe_relative_update_error is the "
        "encoding's own error on the real updates",
        "overrides": extra,
        "runs": runs,
        "targets": {
            "int8_bytes_at_most_30pct_of_fp32": {
                "ratio": int8["bytes_up_ratio_to_fp32"],
                "met": int8["bytes_up_ratio_to_fp32"] <= BYTES_TARGET,
            },
            "int8_final_loss_within_1pct_of_fp32": {
                "ratio": int8["final_eval_loss_ratio_to_fp32"],
                "met": abs(int8["final_eval_loss_ratio_to_fp32"] - 1) <= LOSS_TARGET,
            },
            "fp16_final_loss_within_1pct_of_fp32": {
                "ratio": runs["fp16"]["final_eval_loss_ratio_to_fp32"],
                "met": abs(runs["fp16"]["final_eval_loss_ratio_to_fp32"] - 1) <= LOSS_TARGET,
            },
        },
    }
    run.write(Path(args.out), result)


if __name__ == "__main__":
    main()
