"""The benchmark suite's registry: every benchmark, in the one place the runner, `--list` and
the README table read.

Each entry names its script (a file in `benchmarks/`), the arguments the suite runs it with
(those that reproduce its committed result), the result files it writes in
`benchmarks/results/`, whether it is long (more than about 30 minutes on the project's
2-core machine: run only when named or with `--all`), and a function that pulls 1-3 headline
figures out of its JSON for the README table. A new script that writes a result must be
added here (tests/test_bench_suite.py fails otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

__all__ = ["BENCHMARKS", "BENCH_DIR", "RESULTS_DIR", "Benchmark", "by_name"]

Headline = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark as the suite runs it."""

    name: str
    script: str  # a file in benchmarks/, or an absolute path (a test's registry)
    description: str  # one line, for --list
    results: tuple[str, ...]  # JSON files it writes, relative to the results folder
    headline: Headline
    args: tuple[str, ...] = ()
    long: bool = False
    minutes: float | None = None  # wall time of its committed result, where there is one

    def script_path(self, bench_dir: Path = BENCH_DIR) -> Path:
        return bench_dir / self.script

    def present(self, bench_dir: Path = BENCH_DIR) -> bool:
        return self.script_path(bench_dir).is_file()


def by_name(registry: tuple[Benchmark, ...]) -> dict[str, Benchmark]:
    return {b.name: b for b in registry}


# -- headline figures: one small function per benchmark, reading its JSON as written -------


def _met(value: float, target: float, *, at_most: bool) -> str:
    ok = value <= target if at_most else value >= target
    return "met" if ok else "missed"


def _ci(metric: Mapping[str, Any], digits: int = 3) -> str:
    return (
        f"{metric['value']:.{digits}f} "
        f"[{metric['ci_low']:.{digits}f}, {metric['ci_high']:.{digits}f}]"
    )


def _quickstart(d: Mapping[str, Any]) -> list[str]:
    loss = d["global_eval_loss"]
    eps = max(d["epsilon_guarantee"].values())
    delta = max(d["delta"].values())
    verify = "audit verify OK" if d["audit_verify"]["exit_code"] == 0 else "audit verify FAILED"
    return [
        f"{d['sites']} sites x {d['rounds']} rounds in {d['wall_seconds']:.0f} s",
        f"held-out loss {loss[0]:.3f} -> {loss[-1]:.3f}",
        f"max site ε {eps:.2f} (δ ≤ {delta:.1e}); {verify}",
    ]


def _dp_step(d: Mapping[str, Any]) -> list[str]:
    target = d["target_ratio"]
    modes = d.get("modes") or {d["grad_sample_mode"]: d}  # results before modes were measured
    ratios = []
    for mode, entry in modes.items():
        ratio = entry.get("ratio_dp_over_plain")
        ratios.append(f"{mode} failed" if ratio is None else f"{mode} {ratio:.2f}x")
    worst = max(
        (e["ratio_dp_over_plain"] for e in modes.values() if e.get("ratio_dp_over_plain")),
        default=None,
    )
    verdict = "" if worst is None else f" (target ≤ {target}x: {_met(worst, target, at_most=True)})"
    return [
        "DP/plain step: " + ", ".join(ratios) + verdict,
        f"plain step {d['plain_median_s']:.2f} s, batch {d['batch']}, {d['device']}",
    ]


def _canary_audit(d: Mapping[str, Any]) -> list[str]:
    runs = d["runs"]
    out = []
    if "record-dp" in runs:
        dp, nodp = runs["record-dp"], runs.get("record-nodp", {})
        out.append(
            f"record level: lower bound {dp['epsilon_lower_bound']:.2f} ≤ proven ε "
            f"{dp['proven_epsilon']:.2f}; no DP {nodp.get('epsilon_lower_bound', float('nan')):.2f}"
        )
    if "user-dp" in runs:
        dp, nodp = runs["user-dp"], runs.get("user-nodp", {})
        out.append(
            f"user level: lower bound DP {dp['epsilon_lower_bound']:.2f}, "
            f"no DP {nodp.get('epsilon_lower_bound', float('nan')):.2f}"
        )
    return out


def _he_aggregation(d: Mapping[str, Any]) -> list[str]:
    prim = d["primitives_one_core"][0]  # the default chain
    targets = d["targets"]
    enc, ratio = prim["encrypt_seconds_per_1m"], prim["ciphertext_bytes_over_fp32"]
    out = [
        f"encrypt {enc:.2f} s / 1M values, one core (target ≤ {targets['encrypt_seconds_per_1m']}:"
        f" {_met(enc, targets['encrypt_seconds_per_1m'], at_most=True)})",
        f"ciphertext {ratio:.1f}x fp32 (target ≤ {targets['ciphertext_bytes_over_fp32']}:"
        f" {_met(ratio, targets['ciphertext_bytes_over_fp32'], at_most=True)})",
    ]
    rounds = d.get("quickstart_rounds") or {}
    if "he_over_plaintext_round_time" in rounds:
        r, t = rounds["he_over_plaintext_round_time"], targets["he_over_plaintext_round_time"]
        out.append(f"HE/plaintext round {r:.2f}x (target ≤ {t}: {_met(r, t, at_most=True)})")
    return out


def _transport(d: Mapping[str, Any]) -> list[str]:
    sig = d["signatures"]
    r, t = d["secure_over_plain_round_time"], d["target"]["secure_over_plain_round_time"]
    return [
        f"TLS + node auth + signatures / plain round {r:.2f}x "
        f"(target ≤ {t}: {_met(r, t, at_most=True)}), {d['model']} model",
        f"Ed25519 sign {sig['sign_ms']:.2f} ms, verify {sig['verify_ms']:.2f} ms "
        f"per {sig['parameters']:,}-parameter update",
    ]


def _safety_filters(d: Mapping[str, Any]) -> list[str]:
    res = d["results"]
    emb = res["embedding"]
    target = emb["target"]["auroc_at_least"]
    met = "met" if emb["target"]["met_by_ci_lower_bound"] else "missed"
    return [
        f"embedding AUROC {_ci(emb['metrics']['auroc'])} cross-source (target ≥ {target}: {met})",
        f"lexicon AUROC {_ci(res['lexicon']['metrics']['auroc'])}",
    ]


def _safety_response(d: Mapping[str, Any]) -> list[str]:
    res, target = d["results"], d["target"]
    met = "met" if target["met_by_ci_lower_bound"] else "missed"
    return [
        f"response filter AUROC {_ci(res['response']['all']['metrics']['auroc'])} on PyRIT's "
        f"human-labelled answers (target ≥ {target['response_auroc_at_least']}: {met})",
        f"lexicon AUROC {_ci(res['lexicon']['all']['metrics']['auroc'])}",
    ]


def _safety_screening(d: Mapping[str, Any]) -> list[str]:
    full = d["full_probe_set"]
    base = full["base"]["by_filter"]["response"]["harmful_compliance"]
    final = full["final"]["by_filter"]["response"]["harmful_compliance"]
    gate = full["gate_on_full_probes"]
    return [
        f"harmful compliance (response filter, {base['total']} harmful probes) "
        f"{100 * base['rate']:.1f}% base -> {100 * final['rate']:.1f}% after training",
        f"gate {'tripped' if gate['tripped'] else 'not tripped'}; "
        f"detects a rise of {gate['detectable_rise_points']:.1f} points",
    ]


def _robustness(d: Mapping[str, Any]) -> list[str]:
    table = d["grid"]["table"]
    defended = [
        cell["ratio_to_no_attacker"]
        for attack in table.values()
        for defence, cell in attack.items()
        if defence not in ("none", "dp-sgd")
    ]
    undefended = max(a["none"]["ratio_to_no_attacker"] for a in table.values())
    dp = max(a["dp-sgd"]["ratio_to_no_attacker"] for a in table.values() if "dp-sgd" in a)
    backdoor = table["backdoor"]
    defended_bd = max(
        cell.get("backdoor_success", 0.0)
        for defence, cell in backdoor.items()
        if defence not in ("none", "dp-sgd")
    )
    return [
        f"held-out loss vs no attacker: ≤ {max(defended):.3f}x with norm bound or any robust "
        f"rule, up to {undefended:.2f}x undefended, {dp:.2f}x DP-SGD alone (tiny grid)",
        f"backdoor success {100 * backdoor['none']['backdoor_success']:.0f}% undefended, "
        f"at most {100 * defended_bd:.0f}% defended",
    ]


def _scale(d: Mapping[str, Any]) -> list[str]:
    streaming = [r for r in d["runs"] if r["streaming"]]
    largest = max(streaming, key=lambda r: r["sites"])
    rounds = largest["round_seconds"]
    out = [
        f"{largest['sites']:,} sites ({largest['status']}): peak coordinator RSS "
        f"{largest['peak_rss_mib']:.0f} MiB, {sum(rounds) / len(rounds):.1f} s per round"
    ]
    targets = d.get("targets")
    if targets:
        verdict = "met" if targets["memory_within_10_percent"] else "missed"
        out.append(
            f"memory 1,000 / 100 sites {targets['memory_1000_over_100_streaming']:.2f}x "
            f"streaming (target ≤ 1.10x: {verdict}), "
            f"{targets['memory_1000_over_100_listed']:.2f}x listed"
        )
    return out


def _userdp_scale(d: Mapping[str, Any]) -> list[str]:
    runs, setup = d["runs"], d["setup"]
    dp, plain = runs["user-dp"]["eval_loss"], runs["no-dp"]["eval_loss"]
    return [
        f"{setup['sites']:,} sites, {setup['expected_sites_per_round']:.0f} a round, "
        f"{len(dp) - 1} rounds: held-out loss {dp[0]:.3f} -> {dp[-1]:.3f} under user-level DP "
        f"at ε {d['epsilon']:.2f} (δ {d['delta']:g}); {plain[-1]:.3f} without DP",
    ]


def _update_encoding(d: Mapping[str, Any]) -> list[str]:
    runs, targets = d["runs"], d["targets"]
    size = targets["int8_bytes_at_most_30pct_of_fp32"]
    loss = targets["int8_final_loss_within_1pct_of_fp32"]
    fp32 = runs["fp32"]["bytes_up_per_site_per_round"][0]
    return [
        f"upload per site per round: fp32 {fp32 / 1e6:.2f} MB, "
        f"fp16 {100 * runs['fp16']['bytes_up_ratio_to_fp32']:.0f}%, "
        f"int8 {100 * size['ratio']:.0f}% (target ≤ 30%: {'met' if size['met'] else 'missed'})",
        f"int8 final held-out loss {loss['ratio']:.3f}x fp32's "
        f"(target within 1%: {'met' if loss['met'] else 'missed'})",
    ]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        name="quickstart",
        script="quickstart.py",
        description="the README's quickstart (`flwr run . --stream`) timed end to end, audited",
        results=("quickstart_flwr_run.json",),
        headline=_quickstart,
        minutes=4,
    ),
    Benchmark(
        name="dp_step",
        script="dp_step.py",
        description="one DP-SGD step vs one plain step, every grad-sample mode that works on LoRA",
        results=("dp_step.json",),
        headline=_dp_step,
        minutes=3,
    ),
    Benchmark(
        name="canary_audit",
        script="canary_audit.py",
        description="empirical ε lower bounds (canaries), DP vs no DP, record and user level",
        results=("canary_audit.json",),
        headline=_canary_audit,
        minutes=25,
    ),
    Benchmark(
        name="he_aggregation",
        script="he_aggregation.py",
        description="CKKS primitives on one core, and HE vs plaintext quickstart rounds",
        results=("he_aggregation.json",),
        headline=_he_aggregation,
        minutes=24,
    ),
    Benchmark(
        name="transport",
        script="transport.py",
        description="TLS, node authentication and signatures vs plain, on real SuperNodes",
        results=("transport-tiny.json",),
        headline=_transport,
        args=(
            "--model",
            "tiny",
            "--rounds",
            "4",
            "--repeats",
            "2",
            "--out",
            "benchmarks/results/transport-tiny.json",
        ),
        minutes=18,
    ),
    Benchmark(
        name="safety_filters",
        script="safety_filters.py",
        description="lexicon, embedding and judge filters on prompts, cross-source, with CIs",
        results=("safety_filters.json",),
        headline=_safety_filters,
        minutes=1,
    ),
    Benchmark(
        name="safety_response",
        script="safety_response.py",
        description="the response filter on PyRIT's human-labelled answers",
        results=("safety_response.json",),
        headline=_safety_response,
        args=("--device", "cpu"),
        minutes=12,
    ),
    Benchmark(
        name="safety_screening",
        script="safety_screening.py",
        description="safety screening of the embedded model before and after federated training",
        results=("safety_screening.json",),
        headline=_safety_screening,
        long=True,
        minutes=48,
    ),
    Benchmark(
        name="robustness",
        script="robustness.py",
        description="robust aggregation against one hostile site, every attack x every defence",
        results=("robustness.json",),
        headline=_robustness,
        long=True,
        minutes=36,
    ),
    Benchmark(
        name="scale",
        script="scale.py",
        description="10, 100 and 1,000 sites: coordinator memory and time per round",
        results=("scale.json",),
        headline=_scale,
        long=True,
    ),
    Benchmark(
        name="update_encoding",
        script="update_encoding.py",
        description="bytes per round with fp32, fp16 and int8 update encodings",
        results=("update_encoding.json",),
        headline=_update_encoding,
    ),
    Benchmark(
        name="userdp_scale",
        script="userdp_scale.py",
        description="user-level DP at 1,000 sites",
        results=("userdp_scale.json",),
        headline=_userdp_scale,
        long=True,
    ),
)
