"""Pictures of a run: held-out loss and cumulative ε per site, round by round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_run"]


def plot_run(summary: dict[str, Any], path: Path) -> Path:
    """Write a two-panel PNG (loss per round, ε per round) for `summary` to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: sites and servers have no display
    import matplotlib.pyplot as plt

    rounds = summary["eval_rounds"]
    fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    ax_eps.set(
        title="cumulative ε per site (min of PRV, PLD; record-level)",
        xlabel="round",
        ylabel="ε",
    )
    for ax in (ax_loss, ax_eps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"fedllm run {summary['run_name']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
