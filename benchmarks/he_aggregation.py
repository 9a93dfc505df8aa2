"""Cost of homomorphic aggregation: `python benchmarks/he_aggregation.py`.

Two parts, both measured in this one process:

- **Primitives, one core** (the process is pinned to one CPU): pack + encrypt, the server's
  check + add, and decrypt + unpack of 1M adapter parameters, for the default chain and for
  a longer one; ciphertext bytes / fp32 bytes; the error of the decrypted sum.
- **Rounds on the quickstart**: the embedded SmolLM2-135M, 3 chatterbot sites, record-level
  DP-SGD, FFA-LoRA; the same config with plaintext FedAvg (A) and with HE (B), in pairs run
  A B B A ... so drift in machine load weighs on both. Each run's round wall times come from
  its own `summary.json`.

Writes `benchmarks/results/he_aggregation.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun, abba, add_work_arguments  # noqa: E402


def _primitives(chain: tuple[int, ...], values: int, repeats: int, sites: int) -> dict:
    from fedllm.secure.he import (
        EncryptedSum,
        decrypt_chunks,
        encrypt_chunks,
        key_id,
        make_secret_context,
        payload_digest,
        public_context_bytes,
    )
    from fedllm.secure.he_params import HEParams
    from fedllm.secure.packing import Packing

    params = HEParams(coeff_mod_bit_sizes=chain)
    secret = make_secret_context(params)
    import tenseal as ts

    public = ts.context_from(public_context_bytes(secret))
    packing = Packing.for_arrays({"x": (values,)}, params.slots)
    rng = np.random.default_rng(0)
    updates = [{"x": rng.normal(0, 1e-2, values).astype(np.float32)} for _ in range(sites)]
    weights = [float(w) for w in rng.integers(100, 1000, sites)]
    enc, add, dec, errors, size = [], [], [], [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        blobs = [
            encrypt_chunks(secret, packing.pack(u, w))
            for u, w in zip(updates, weights, strict=True)
        ]
        enc.append((time.perf_counter() - t) / sites)
        size = sum(len(b) for b in blobs[0])
        total = EncryptedSum(public, key_id(secret), packing.chunk_sizes)
        t = time.perf_counter()
        for i, (b, w) in enumerate(zip(blobs, weights, strict=True)):
            total.add(
                b, weight=w, key=key_id(secret), digest=payload_digest(b), sender=f"s{i}", site=i
            )
        summed = total.blobs()
        add.append((time.perf_counter() - t) / sites)
        t = time.perf_counter()
        out = packing.unpack(decrypt_chunks(secret, summed, what="sum"), total.weight)
        dec.append(time.perf_counter() - t)
        plain = sum(w * u["x"].astype(np.float64) for u, w in zip(updates, weights, strict=True))
        plain /= sum(weights)
        scale = max(float(np.abs(u["x"]).max()) for u in updates)
        errors.append(float(np.abs(out["x"] - plain).max()) / scale)
    per_m = 1e6 / values
    return {
        "coeff_mod_bit_sizes": list(chain),
        "poly_modulus_degree": params.poly_modulus_degree,
        "scale_bits": params.scale_bits,
        "ciphertexts_per_1m": len(packing.chunk_sizes) * per_m,
        "encrypt_seconds_per_1m": statistics.median(enc) * per_m,
        "server_check_and_add_seconds_per_1m_per_site": statistics.median(add) * per_m,
        "decrypt_seconds_per_1m": statistics.median(dec) * per_m,
        "ciphertext_bytes_over_fp32": size / (4 * values),
        "max_abs_error_relative_to_update_scale": max(errors),
    }


def _summary_figures(s: dict) -> dict:
    he_rounds = (s.get("secure_aggregation") or {}).get("rounds", [])
    return {
        "round_seconds": s["round_seconds"],
        "he_server_seconds": [r["server_seconds"] for r in he_rounds],
        "he_site_seconds_mean": [
            statistics.mean(r["site_seconds"].values()) for r in he_rounds if r["site_seconds"]
        ],
        "eval_loss": s["eval_loss"],
        "epsilon": s["epsilon"],
        "bytes_per_round": s["bytes_per_round"],
        "status": s["status"],
    }


def _round_runs(run: BenchmarkRun, work: Path, rounds: int, pairs: int) -> dict:
    from fedllm.secure.he import PUBLIC_CONTEXT, SECRET_CONTEXT, write_key_files
    from fedllm.secure.he_params import HEParams
    from tests.simulate import simulate

    keys = work / "keys"
    if not run.reuse(keys):
        write_key_files(HEParams(), keys)
        run.mark_made(keys)
    base = {"run.rounds": rounds, "run.output-dir": str(work / "runs"), "run.seed": 0}
    modes = {
        "A": ("plaintext", {}),
        "B": (
            "he",
            {
                "strategy.secure-aggregation": "he",
                "he.public-context": str(keys / PUBLIC_CONTEXT),
                "he.site-context": str(keys / SECRET_CONTEXT),
            },
        ),
    }
    runs: dict[str, list[dict]] = {"plaintext": [], "he": []}
    order = []
    for pair, side in abba(pairs):
        mode, extra = modes[side]
        name = f"{mode}-{pair}"
        run_dir = work / "runs" / name
        order.append(name)
        if not run.reuse(run_dir):
            t = time.perf_counter()
            simulate({**base, **extra, "run.name": name}, cpus_per_site=1)  # two actors
            print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)
            run.mark_made(run_dir)
        runs[mode].append(
            {"run": name, **_summary_figures(json.loads((run_dir / "summary.json").read_text()))}
        )
    out: dict = {"order": order, **runs}
    # Round 1 of each run also warms caches; the steady-state rounds are compared, per pair.
    per_pair = [
        statistics.mean(h["round_seconds"][1:]) / statistics.mean(p["round_seconds"][1:])
        for p, h in zip(runs["plaintext"], runs["he"], strict=True)
    ]
    out["he_over_plaintext_round_time_per_pair"] = per_pair
    out["he_over_plaintext_round_time"] = statistics.median(per_pair)
    out["round_time_compared"] = "mean of rounds 2.. of each run; median over pairs"
    he_work = statistics.mean(
        statistics.mean(h["he_site_seconds_mean"]) + statistics.mean(h["he_server_seconds"])
        for h in runs["he"]
    )
    he_round = statistics.mean(statistics.mean(h["round_seconds"][1:]) for h in runs["he"])
    out["he_work_share_of_round"] = he_work / he_round
    up = [runs[m][0]["bytes_per_round"][-1]["up"] for m in ("plaintext", "he")]
    out["he_over_plaintext_upload_bytes"] = up[1] / up[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per quickstart run")
    parser.add_argument("--skip-rounds", action="store_true")
    parser.add_argument("--pairs", type=int, default=2, help="plaintext/HE pairs, run A B B A")
    add_work_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/he_aggregation.json"))
    args = parser.parse_args()
    run = BenchmarkRun("he_aggregation", allow_reuse=args.reuse)
    work = Path(args.work or tempfile.mkdtemp(prefix="fedllm-he-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})  # "one core": TenSEAL may otherwise use threads
    primitives = [
        _primitives(c, args.values, args.repeats, 3) for c in ((60, 60), (60, 40, 40, 60))
    ]
    os.sched_setaffinity(0, cpus)
    for p in primitives:
        print(json.dumps(p), flush=True)
    result = {
        "primitives_one_core": primitives,
        "targets": {
            "encrypt_seconds_per_1m": 1.0,
            "ciphertext_bytes_over_fp32": 10.0,
            "he_over_plaintext_round_time": 2.0,
        },
    }
    if not args.skip_rounds:
        result["quickstart_rounds"] = _round_runs(run, work, args.rounds, args.pairs)
    print(json.dumps(run.write(args.out, result), indent=2))


if __name__ == "__main__":
    main()
