"""A coordinator run without a SuperLink, for tests of the stages: the real `FederatedRun`,
its stages and run directory, handed replies as the loop would hand them over."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.config import parse_config
from fedllm.model import adapter_spec
from fedllm.rundir import RunDir
from fedllm.secure.he import PUBLIC_CONTEXT, SECRET_CONTEXT
from fedllm.strategy.loop import FederatedRun
from fedllm.wire import ARRAYS, METRICS, arrays_to_record
from tests.replies import mock_reply

__all__ = [
    "TRAIN_EXAMPLES",
    "Recorder",
    "coordinator_run",
    "he_settings",
    "seeded_run",
    "signed_settings",
    "train_metrics",
    "train_reply",
]

TRAIN_EXAMPLES = 100  # what each site reported when it evaluated the initial adapter
EVAL_FIGURES = {"num-examples": 8, "eval-loss": 2.0, "perplexity": 7.4, "eval-tokens": 64}


def signed_settings(pki: Any) -> dict[str, Any]:
    """The run-config keys of a run whose updates are signed, with the keys of `pki` (the
    `pki` fixture: registry, coordinator keys, one signing key per site folder)."""
    return {
        "security.sign-updates": True,
        "security.registry": str(pki.registry),
        "security.coordinator-key": str(pki.coordinator_key),
        "security.coordinator-public-key": str(pki.coordinator_pub),
        "security.site-signing-key": str(pki.root / "sites" / "site-{partition}" / "signing.key"),
    }


def he_settings(keys: Path) -> dict[str, str]:
    """The run-config keys of a run aggregating under HE with the key files in `keys`."""
    return {
        "strategy.secure-aggregation": "he",
        "he.public-context": str(keys / PUBLIC_CONTEXT),
        "he.site-context": str(keys / SECRET_CONTEXT),
    }


def coordinator_run(
    tiny_model_dir: Path, out: Path, *, num_sites: int = 3, build: bool = True, **overrides: Any
) -> FederatedRun:
    """A new run's coordinator in `out` with `num_sites` connected sites; with `build`, its
    stages chained around the configured Flower strategy and begun."""
    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "run.name": "r",
            "run.output-dir": str(out),
            **overrides,
        }
    )
    run = FederatedRun(
        None, cfg, RunDir.create(cfg, {"rounds_completed": 0}), adapter_spec(cfg.model, cfg.lora)
    )
    run.ctx.num_sites = num_sites
    if build:
        run.strategy = run.pipeline.build()
        run.pipeline.begin()
    return run


def seeded_run(
    tiny_model_dir: Path, tmp_path: Path, *, sites: int = 3, **extra: Any
) -> FederatedRun:
    """A built, begun run whose `sites` sites each evaluated the initial adapter and reported
    `TRAIN_EXAMPLES` training examples (round 0, which fixes each site's weight ceiling)."""
    overrides = {"run.min-sites": 1, "privacy.mode": "none", **extra}
    run = coordinator_run(tiny_model_dir, tmp_path, num_sites=sites, build=False, **overrides)
    for site in range(sites):
        run.ctx.book.record("evals", 0, site, {**EVAL_FIGURES, "train-examples": TRAIN_EXAMPLES})
    run.strategy = run.pipeline.build()
    run.pipeline.begin()
    return run


def train_metrics(site: int, num_examples: Any = TRAIN_EXAMPLES) -> dict[str, Any]:
    """The figures a non-DP site's train reply carries."""
    return {
        "site": site,
        "num-examples": num_examples,
        "train-loss": 2.0,
        "epsilon": float("inf"),
        "delta": 0.0,
        "noise-multiplier": 0.0,
    }


def train_reply(run: FederatedRun, site: int, arrays: Any = None, **metrics: Any) -> Message:
    """Site `site`'s train reply carrying `arrays` (by default the global adapter + 0.01)."""
    if arrays is None:
        arrays = {n: a + 0.01 for n, a in run.ctx.arrays.items()}
    content = RecordDict(
        {ARRAYS: arrays_to_record(arrays), METRICS: MetricRecord(train_metrics(site, **metrics))}
    )
    return mock_reply(content, node_id=site + 1)


class Recorder(Strategy):
    """An inner strategy that samples nobody, keeps the replies that reach it, and adopts
    the first one's update."""

    def __init__(self) -> None:
        self.train: list[Message] = []
        self.evaluate: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.train = list(replies)
        return (self.train[0].content[ARRAYS] if self.train else None), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        self.evaluate = list(replies)
        return None

    def summary(self) -> None:
        pass
