"""`fedllm audit report`: one self-contained HTML page (and markdown) about a run's privacy.

Everything in it is recomputed from the run directory (ledger, summary, config), so the
report states what the ledger proves, not what the operator claims; the ledger check result
is printed at the top.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fedllm.plots import png_base64
from fedllm.privacy.accounting import MECHANISMS, epsilon_curve
from fedllm.privacy.ledger import DP_SGD, MECHANISM_NAMES, Ledger
from fedllm.privacy.verify import plausible, verify_records
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import AtRestKey

__all__ = ["build_report"]

DELTAS = [10.0**-k for k in range(12, 1, -1)]


def _histories(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Spend records per history: "site k" (record-level DP-SGD) and "user-level" (the run's
    DP-FedAvg). The two protect different units and are never composed together."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("mechanism") in MECHANISM_NAMES and plausible(r):  # the rest: a problem
            key = f"site {r['site']}" if r["mechanism"] == DP_SGD else "user-level"
            out.setdefault(key, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == "user-level", kv[0])))


def _plots(sites: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    # heavy: matplotlib takes ~1.4 s to import; only drawing needs it
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, recs in sites.items():
        ax.plot(
            [0] + [r["round"] for r in recs],
            [0.0] + [r["guarantee"] for r in recs],
            marker="o",
            linestyle=":" if label == "user-level" else "-",
            label=label if label == "user-level" else f"{label} (record-level)",
        )
    ax.set(
        title="cumulative ε over rounds (min of PRV, PLD); each line its own guarantee",
        xlabel="round",
        ylabel="ε",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    over_rounds = png_base64(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, recs in sites.items():
        history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in recs]
        curve = epsilon_curve(history, DELTAS)
        (line,) = ax.plot(DELTAS, curve["pld"], marker=".", label=f"{label} PLD")
        ax.plot(DELTAS, curve["rdp"], linestyle="--", color=line.get_color(), label=f"{label} RDP")
        ax.axvline(recs[-1]["delta"], color=line.get_color(), alpha=0.3)
    ax.set_xscale("log")
    ax.set(
        title="ε(δ) at the end of the run (vertical lines: each history's δ)",
        xlabel="δ",
        ylabel="ε",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return {"epsilon_over_rounds": over_rounds, "epsilon_delta": png_base64(fig)}


def _tables(
    summary: dict[str, Any], sites: dict[str, list[dict[str, Any]]]
) -> dict[str, tuple[list[str], list[list[str]]]]:
    budget = summary.get("budget", {})
    user = summary.get("user_level") or {}
    mech_rows, acc_rows, budget_rows = [], [], []
    for label, recs in sites.items():
        last = recs[-1]
        is_user = label == "user-level"
        if is_user:
            cap = user.get("epsilon_max")
            within = user.get("within_budget", cap is None)
            exhausted = "user-level" in (summary.get("stop_reason") or "")
            clip = ", ".join(f"{r['clip_norm']:.3g}" for r in recs)
            mechanism = "DP-FedAvg Gaussian (server), user-level, add/remove one site's data"
            if str(last.get("noise", "")).startswith("distributed"):
                shares = ", ".join(str(r.get("noise_shares")) for r in recs)
                mechanism = (
                    "DP-FedAvg Gaussian, user-level, add/remove one site's data; noise added "
                    f"by the sites in shares under HE (shares per round: {shares}; σ is what "
                    f"arrived, planned {last.get('planned_noise_multiplier')}); assumes "
                    f"{last.get('assumption', 'honest sites')}"
                )
        else:
            cap = budget.get("epsilon_max")
            status = budget.get("sites", {}).get(label.split()[-1], {})
            within = status.get("within_budget", cap is None)
            exhausted = bool(status.get("exhausted"))
            clip = f"{last['max_grad_norm']:g}"
            mechanism = "DP-SGD (Opacus), record-level, add/remove one example"
        mech_rows.append(
            [
                label,
                mechanism,
                f"{last['noise_multiplier']:.4g}",
                f"{last['sample_rate']:.4g} ({last['sampling']})",
                str(sum(r["steps"] for r in recs)),
                clip,
                f"{last['delta']:.3g}",
            ]
        )
        acc_rows.append(
            [label]
            + [f"{last['epsilon'][m]:.4f}" for m in MECHANISMS]
            + [f"{last['guarantee']:.4f}"]
        )
        budget_rows.append(
            [
                label,
                "none" if cap is None else f"{cap:g}",
                f"{last['guarantee']:.4f}",
                "yes" if within else "NO",
                "yes" if exhausted else "no",
            ]
        )
    return {
        "Mechanisms and parameters": (
            ["history", "mechanism", "σ / z", "sampling rate", "steps", "clip norm", "δ"],
            mech_rows,
        ),
        "Accountant comparison (cumulative ε at each history's δ)": (
            ["history", "RDP (upper bound)", "PRV", "PLD", "guarantee = min(PRV, PLD)"],
            acc_rows,
        ),
        "Budget status": (
            ["history", "ε budget", "ε spent", "within budget", "budget stopped it"],
            budget_rows,
        ),
    }


def _fmt(value: float | None) -> str:
    return "none (no DP)" if value is None else f"{value:.4f}"


def _empirical_tables(
    run_dir: Path,
) -> tuple[dict[str, tuple[list[str], list[list[str]]]], list[str]]:
    """Lower bounds beside the proven ε, and secret exposures, from `fedllm audit canaries`
    (audit/empirical.json) and the server's canary clients (audit/canary-clients.json)."""
    rows, exposures, bugs = [], [], []
    run = RunDir.at(run_dir)
    record = run.empirical_audit_path
    if record.is_file():
        r = json.loads(record.read_text(encoding="utf-8"))
        for kind, label in (
            ("gradient_canaries", "record-level, white-box gradient canaries"),
            ("membership", "record-level, black-box random-word canaries"),
        ):
            if kind in r:
                g = r[kind]
                rows.append(
                    [
                        f"site {r['site']}: {label}",
                        f"{_fmt(r['proven_epsilon'])} ({r['proven_from']})",
                        f"{g['epsilon_lower_bound']:.4f}",
                        f"{g['correct']}/{g['guesses']} right of {g['canaries']} "
                        f"({g['included']} in)",
                        f"{r['delta']:.3g}",
                    ]
                )
        for secret in r.get("secrets", []):
            exposures.append(
                [
                    f"{secret['name']} (x{secret['repeats']})",
                    f"{secret['base']['exposure_extrapolated']:.2f}",
                    f"{secret['trained']['exposure_extrapolated']:.2f}",
                    f"{secret['trained']['rank']} of {secret['trained']['alternatives'] + 1}",
                ]
            )
        if r.get("status") == "BUG":
            bugs.append(f"{record}: an empirical lower bound exceeds the proven epsilon")
    clients = run.canary_clients_audit_path
    if clients.is_file():
        c = json.loads(clients.read_text(encoding="utf-8"))
        rows.append(
            [
                "user-level, canary clients (cosine, Andrew et al.)",
                _fmt(c["proven_epsilon"]),
                f"{c['epsilon_lower_bound']:.4f} (estimate {c['epsilon_estimate']:.4f})",
                f"μ {c['mu']:.3f}, {c['inserted']} of {c['canary_clients']} inserted",
                f"{c['delta']:.3g}",
            ]
        )
        if c.get("status") == "BUG":
            bugs.append(f"{clients}: the canary-client lower limit exceeds the proven epsilon")
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    if rows:
        tables["Empirical lower bounds beside the proven ε (95% confidence)"] = (
            ["audit", "proven ε", "ε lower bound", "evidence", "δ"],
            rows,
        )
    if exposures:
        tables["Exposure of inserted secrets, bits (Carlini et al. 2019)"] = (
            ["secret", "base model", "trained model", "rank of the secret"],
            exposures,
        )
    return tables, bugs


def build_report(
    run_dir: Path, *, at_rest: AtRestKey | None = None
) -> tuple[Path, Path, list[str]]:
    """Write `audit-report.html` and `audit-report.md` into `run_dir`; returns their paths
    and the ledger problems found (empty when the ledger verifies). A sealed ledger is
    opened under `at_rest`; the report itself is plaintext, for the auditor."""
    run = RunDir.at(run_dir)
    summary = json.loads(run.summary_path.read_text(encoding="utf-8"))
    config = json.loads(run.config_path.read_text(encoding="utf-8"))
    records = Ledger(run.ledger_path, key=at_rest).records()
    problems = verify_records(records)
    sites = _histories(records)
    tables = _tables(summary, sites)
    empirical, bugs = _empirical_tables(run_dir)
    tables.update(empirical)
    plots = _plots(sites) if sites else {}
    integrity = (
        f"VERIFIED: {len(records)} ledger records, hash chain intact, every ε recomputed from "
        "the raw parameters by RDP, PRV and PLD."
        if not problems
        else f"FAILED: {len(problems)} problems — " + "; ".join(problems)
    )
    facts = [
        ("Run", summary["run_name"]),
        (
            "Status",
            f"{summary['status']}, {summary['rounds_completed']}/"
            f"{summary['rounds_planned']} rounds",
        ),
        ("Guarantee", summary["privacy"]["guarantee"]),
        ("Noise RNG", _noise_rng_text(summary)),
        ("Ledger integrity", integrity),
        (
            "Empirical audit",
            ("FAILED: " + "; ".join(bugs))
            if bugs
            else "lower bounds at or below the proven ε"
            if empirical
            else "not run (an auditing run sets audit.* canaries)",
        ),
        ("Secure aggregation", _secure_aggregation_text(summary)),
        ("Update signatures", _signatures_text(summary)),
        ("Encryption at rest", _at_rest_text(summary)),
        ("Config SHA-256", config["config_hash"]),
        ("Package versions", ", ".join(f"{k} {v}" for k, v in summary["versions"].items())),
    ]
    md = _markdown(facts, tables, summary)
    page = _html(facts, tables, plots, summary)
    md_path, html_path = run.audit_report_paths()
    md_path.write_text(md, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return html_path, md_path, problems + bugs


def _noise_rng_text(summary: dict[str, Any]) -> str:
    """Where the noise behind the guarantee came from. fedllm builds Opacus' `DPOptimizer`
    without `secure_mode` (fedllm/privacy/dpsgd.py), so torch draws DP-SGD noise from its
    default CPU generator; user-level noise and every sampling draw use
    `fedllm.privacy.userdp.secure_rng` or an OS-seeded numpy generator (fedllm/train.py)."""
    secure = json.dumps(summary["privacy"].get("secure_rng"))
    return (
        "DP-SGD noise comes from torch's default generator: fedllm runs Opacus with secure_mode "
        "off (secure_mode needs torchcsprng, which is not available here), so that generator "
        "is a Mersenne Twister, not cryptographically secure, seeded by torch at start-up "
        "(never from the config), and the Gaussian sampler lacks secure_mode's defence against "
        "floating-point attacks. User-level noise, noise shares and Poisson sampling come from "
        "numpy generators seeded from the OS, not cryptographically secure either. The "
        "guarantee assumes exact Gaussian noise no one can predict (summary.json: "
        f"privacy.secure_rng = {secure})."
    )


def _signatures_text(summary: dict[str, Any]) -> str:
    """Which sites' updates were proven theirs: the statement an auditor can check against
    `registry.json` (key ids) and `rejected_updates` in summary.json."""
    security = summary.get("security") or {}
    if not security.get("sign_updates"):
        return "off: updates were not signed; which site sent an update rests on Flower's node ids"
    keys = security.get("site_keys") or {}
    verified = security.get("verified") or {}
    checked = sum(len(v) for phases in verified.values() for v in phases.values())
    rejected = summary.get("rejected_updates") or []
    named = ", ".join(f"{k['name']} {k['key_id'][:12]}" for k in keys.values())
    text = (
        f"Ed25519 over (run, round, node, phase, SHA-256 of the reply), checked against "
        f"{len(keys)} registered site keys "
        f"({named}); "
        f"{checked} replies verified before use"
    )
    if rejected:
        text += (
            f"; {len(rejected)} rejected ("
            + "; ".join(f"round {r['round']} {r['sender']}: {r['reason']}" for r in rejected)
            + ")"
        )
    return text + "; none rejected" * (not rejected)


def _at_rest_text(summary: dict[str, Any]) -> str:
    key = (summary.get("security") or {}).get("at_rest")
    if not key:
        return "off: checkpoints and the ledger are plaintext on the coordinator's disk"
    return (
        f"{key['cipher']} under key {key['key_id']}: checkpoints and ledger records sealed "
        "(the ledger's hash chain is over the plaintext records, verified above)"
    )


def _secure_aggregation_text(summary: dict[str, Any]) -> str:
    he = summary.get("secure_aggregation")
    if not he:
        return "none: the coordinator saw every site's update in plaintext"
    return (
        f"{he['scheme']}; N={he['poly_modulus_degree']}, primes {he['coeff_mod_bit_sizes']} "
        f"bits, scale 2^{he['scale_bits']}, key {he['key_id'][:16]}...; the coordinator "
        "summed ciphertexts and stored only ciphertexts"
    )


def _markdown(facts: list[tuple[str, str]], tables: dict[str, Any], summary: dict) -> str:
    out = [f"# Privacy audit report: run {summary['run_name']}", ""]
    out += [f"- **{k}**: {v}" for k, v in facts] + [""]
    for title, (head, rows) in tables.items():
        out += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    out += ["Plots: see audit-report.html.", ""]
    return "\n".join(out)


def _html(
    facts: list[tuple[str, str]], tables: dict[str, Any], plots: dict[str, str], summary: dict
) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Privacy audit: {esc(summary['run_name'])}</title>",
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;"
        "padding:4px 8px;text-align:right}th{background:#eee}dt{font-weight:bold}"
        "dd{margin:0 0 .6em 1em}.bad{color:#b00}</style></head><body>",
        f"<h1>Privacy audit report: run {esc(summary['run_name'])}</h1><dl>",
    ]
    for key, value in facts:
        cls = " class='bad'" if value.startswith("FAILED") else ""
        parts.append(f"<dt>{esc(key)}</dt><dd{cls}>{esc(value)}</dd>")
    parts.append("</dl>")
    for title, (head, rows) in tables.items():
        parts.append(f"<h2>{esc(title)}</h2><table><tr>")
        parts += [f"<th>{esc(h)}</th>" for h in head]
        parts.append("</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
    for title, key in (
        ("Cumulative ε over rounds", "epsilon_over_rounds"),
        ("ε(δ) curves", "epsilon_delta"),
    ):
        if key in plots:
            parts.append(
                f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{plots[key]}'>"
            )
    parts.append("</body></html>")
    return "".join(parts)
