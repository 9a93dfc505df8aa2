"""The benchmarks' plots: matplotlib without a display, and one way to write a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (files only: benchmark machines have no display)."""
    # heavy: matplotlib takes ~1.4 s to import; only drawing needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path) -> None:
    """Lay `fig` out, write it as a PNG to `out` and close it."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
