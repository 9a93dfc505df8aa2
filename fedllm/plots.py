"""Pictures of a run: held-out loss and cumulative ε per site, round by round, and, when the
run screens the global model, its harmful-compliance and over-refusal rates."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from fedllm.disk import atomic_file

__all__ = ["plot_run", "png_base64"]


def png_base64(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG (for self-contained HTML reports); closes it."""
    # heavy: matplotlib takes ~1.4 s to import; only drawing needs it
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_run(summary: dict[str, Any], path: Path) -> Path:
    """Write a two-panel PNG (loss per round, ε per round) for `summary` to `path`."""
    # heavy: matplotlib takes ~1.4 s to import; only drawing needs it
    import matplotlib

    matplotlib.use("Agg")  # files only: sites and servers have no display
    import matplotlib.pyplot as plt

    rounds = summary["eval_rounds"]
    safety = summary.get("safety") or {}
    screened = [safety["base"], *safety.get("rounds", [])] if safety.get("base") else []
    panels = 3 if screened else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    ax_loss, ax_eps = axes[0], axes[1]
    for site, info in summary["sites"].items():
        pts = [(r, v) for r, v in zip(rounds, info["eval_loss"], strict=True) if v is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", label=f"site {site}")
        eps = sorted((int(r), e) for r, e in info["epsilon"].items() if e is not None)
        if eps:
            ax_eps.plot(*zip(*([(0, 0.0)] + eps), strict=True), marker="o", label=f"site {site}")
    glob = [(r, v) for r, v in zip(rounds, summary["eval_loss"], strict=True) if v is not None]
    if glob:
        ax_loss.plot(
            *zip(*glob, strict=True), color="black", linewidth=2.5, marker="o", label="all sites"
        )
    ax_loss.set(title="held-out loss of the global adapter", xlabel="round", ylabel="loss")
    user = [
        (int(r["round"]), float(r["epsilon"]))
        for r in (summary.get("user_level") or {}).get("rounds", [])
        if r.get("epsilon") is not None
    ]
    if user:  # a separate guarantee, drawn apart (no site's participation is needed for it)
        ax_eps.plot(
            *zip(*([(0, 0.0)] + user), strict=True),
            color="black",
            linestyle=":",
            marker="o",
            label="user-level (whole site)",
        )
    ax_eps.set(
        title="cumulative ε (min of PRV, PLD): record-level per site, user-level apart"
        if user
        else "cumulative ε per site (min of PRV, PLD; record-level)",
        xlabel="round",
        ylabel="ε",
    )
    if screened:
        _plot_safety(axes[2], screened, safety.get("rollbacks", []))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run with no ε at all draws no line
            ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"fedllm run {summary['run_name']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a full disk leaves the last round's plot, not half
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _plot_safety(ax: Any, screened: list[dict[str, Any]], rollbacks: list[dict[str, Any]]) -> None:
    """Both rates per screened round with their 95% intervals, the base model's (round 0) as
    dashed reference lines, and a cross on every rolled-back round."""
    xs = [e["round"] for e in screened]
    for key, label, color in (
        ("harmful_compliance", "harmful compliance", "tab:red"),
        ("benign_over_refusal", "benign over-refusal", "tab:blue"),
    ):
        ys = [100 * e[key]["rate"] for e in screened]
        err = [
            [y - 100 * e[key]["ci95"][0] for y, e in zip(ys, screened, strict=True)],
            [100 * e[key]["ci95"][1] - y for y, e in zip(ys, screened, strict=True)],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=label)
        ax.axhline(ys[0], color=color, linestyle="--", linewidth=1, alpha=0.7)
    rolled = {r["round"] for r in rollbacks}
    if rolled:
        hc = {e["round"]: 100 * e["harmful_compliance"]["rate"] for e in screened}
        ax.scatter(
            sorted(rolled),
            [hc[r] for r in sorted(rolled)],
            marker="x",
            s=120,
            color="black",
            zorder=3,
            label="rolled back",
        )
    ax.set(
        title="safety of the global model (dashed: base model)",
        xlabel="round",
        ylabel="% of probes",
        ylim=(-3, 103),
    )
