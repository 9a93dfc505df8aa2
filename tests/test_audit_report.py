"""`fedllm audit report` (fedllm/privacy/audit/report.py) on a run directory kept in the tests."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

from fedllm.privacy.audit.report import build_report

FIXTURE = Path(__file__).parent / "fixtures" / "record-dp"

GUARANTEE = "record-level (example) DP per site, (epsilon, delta) over the whole run"
NOISE = (
    "DP-SGD noise comes from torch's default generator: fedllm runs Opacus with secure_mode "
    "off (secure_mode needs torchcsprng, which is not available here), so that generator is a "
    "Mersenne Twister, not cryptographically secure, seeded by torch at start-up (never from "
    "the config), and the Gaussian sampler lacks secure_mode's defence against floating-point "
    "attacks. "
    "User-level noise, noise shares and Poisson sampling come from numpy generators seeded "
    "from the OS, not cryptographically secure either. The guarantee assumes exact Gaussian "
    "noise no one can predict (summary.json: privacy.secure_rng = false)."
)


def test_the_report_says_where_the_noise_came_from_next_to_the_guarantee(tmp_path: Path) -> None:
    """Right after the guarantee, both the markdown and the HTML report say that Opacus ran
    without secure_mode, so DP-SGD noise came from torch's default generator."""
    # Prepare
    run = tmp_path / "record-dp"
    shutil.copytree(FIXTURE, run)
    # Execute
    html_path, md_path, problems = build_report(run)
    # Assert
    assert problems == []
    lines = md_path.read_text(encoding="utf-8").splitlines()
    at = lines.index(f"- **Guarantee**: {GUARANTEE}")
    assert lines[at + 1] == f"- **Noise RNG**: {NOISE}"
    assert (
        f"<dt>Guarantee</dt><dd>{html.escape(GUARANTEE)}</dd>"
        f"<dt>Noise RNG</dt><dd>{html.escape(NOISE)}</dd>"
    ) in html_path.read_text(encoding="utf-8")
