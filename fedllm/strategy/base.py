"""`Stage`: one per-round mechanism of the coordinator, as a wrapper around a Flower strategy.

The habit is Flower's own (`DifferentialPrivacyServerSideFixedClipping` wraps an inner
strategy): a stage passes through every hook it does not change, and changes the messages
going out (`configure_*`) or the replies coming in (`aggregate_*`) around its inner
strategy. On top of Flower's hooks a stage owns exactly the part of the run's state that it
restores on resume (`state_keys`) and the `summary.json` sections it writes
(`summary_keys`), and may react to the run's life cycle (`begin`, `round_discarded`,
`finish`, checkpoints). A stage stops the round by raising, never by returning a flag:
`RunStopped` (the round did not happen; the run stops with the last global adapter) or
`RoundDiscarded` (the round happened, its aggregate is not adopted).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.config import FedllmConfig
from fedllm.model import AdapterSpec
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import AtRestKey
from fedllm.strategy.book import RunBook

__all__ = ["RoundDiscarded", "RunContext", "RunStopped", "Stage"]


class RunStopped(Exception):  # noqa: N818 - a stop, not an error: the run ends cleanly
    """The round cannot go on (too few valid updates, a budget spent): the run stops with
    the last global adapter, and `reason` goes into `summary.json` as `stop_reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RoundDiscarded(Exception):  # noqa: N818 - a decision, not an error
    """The round happened (sites trained, their spend is in the ledger) but its aggregate
    is not adopted: the previous global adapter is kept and checkpointed. With `stop` the
    run then stops after this round."""

    def __init__(self, reason: str, *, stop: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.stop = reason, stop


UpdateCheck = Callable[[Message, str], None]


@dataclass
class RunContext:
    """What every stage of one run shares: the config, the record of what each site did
    (`book`), the run directory once it exists, and the global adapter the coordinator can
    read (`arrays`: the trainable tensors that travel; under HE only the initial ones)."""

    cfg: FedllmConfig
    spec: AdapterSpec
    book: RunBook
    grid: Grid | None = None
    run: RunDir | None = None
    at_rest: AtRestKey | None = None
    num_sites: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # How a reply's tensors are checked before they may touch the aggregate; the HE stage
    # replaces the plaintext check with its own (see `fedllm.strategy.validate`).
    update_check: UpdateCheck | None = None
    # True when a stage samples sites on purpose (Poisson sampling under user-level DP), so
    # fewer replies than run.min-sites can be by design.
    sampled_by_design: bool = False
    # Facts a stage publishes for stages further in during the current round (for example
    # the noise multiplier distributed DP accounted); the loop clears them every round.
    notes: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of the run config as `flwr run` submitted it (what the sites were given too):
    # signed into every instruction, so a site can tell it was not changed on the way.
    config_sha256: str = ""
    # The coordinator's Ed25519 key and the digest of its verified registry, once the
    # signatures stage has loaded them (`security.sign-updates`); the manifest signs with it.
    coordinator_key: Any = None
    registry_sha256: str = ""

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor an update must carry, and nothing else."""
        return {n: self.spec.shapes[n] for n in self.spec.sent}

    def ledger(self) -> Ledger:
        """The run's privacy ledger (sealed under the run's at-rest key, if any)."""
        if self.run is None:
            raise RuntimeError("the run directory does not exist yet")
        return Ledger(self.run.ledger_path, key=self.at_rest)

    @property
    def run_id(self) -> int:
        return int(self.grid.run.run_id) if self.grid is not None else 0


class Stage(Strategy):
    """A wrapper around an inner Flower `Strategy`: pass-through unless overridden.

    Subclasses set `name`, `state_keys` and `summary_keys`, decide in `enabled(cfg)`
    whether they act in a run (a disabled stage is not in the message path at all, but
    still writes its summary section), and override the hooks they change.
    """

    name: ClassVar[str] = ""
    state_keys: ClassVar[tuple[str, ...]] = ()
    summary_keys: ClassVar[tuple[str, ...]] = ()
    samples_sites: ClassVar[bool] = False  # see RunContext.sampled_by_design

    def __init__(self, ctx: RunContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.state: dict[str, Any] = {}
        self.strategy: Strategy | None = None  # set by `wrap`

    @classmethod
    def enabled(cls, cfg: FedllmConfig) -> bool:
        """Whether this stage acts on the rounds of a run with this config."""
        return True

    @property
    def active(self) -> bool:
        return type(self).enabled(self.cfg)

    def wrap(self, inner: Strategy) -> Stage:
        self.strategy = inner
        return self

    @property
    def inner(self) -> Strategy:
        if self.strategy is None:
            raise RuntimeError(f"stage {self.name!r} wraps no strategy yet")
        return self.strategy

    @property
    def flower(self) -> Strategy:
        """The Flower strategy this chain of stages ends in."""
        strategy = self.inner
        while isinstance(strategy, Stage):
            strategy = strategy.inner
        return strategy

    # -- Flower's hooks: pass-through ---------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    # -- fedllm's hooks -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This stage's part of `state.json` (only its `state_keys`)."""
        return {k: copy.deepcopy(self.state[k]) for k in self.state_keys if k in self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this stage's part from a saved `state.json` (other keys are ignored)."""
        self.state = {k: copy.deepcopy(state[k]) for k in self.state_keys if k in state}

    def summary_section(self) -> dict[str, Any]:
        """This stage's `summary.json` sections, keyed by `summary_keys` (may be empty)."""
        return {}

    def plan(self) -> str | None:
        """One phrase for the run's opening log line, or None."""
        return None

    def begin(self) -> None:
        """Once sites are connected, before round 0 (or the first round of a resumed run)."""

    def ready(self) -> None:
        """Once round 0 succeeded on enough sites (new run), or the run resumed."""

    def write_files(self, run: RunDir) -> None:
        """Write any file this stage keeps in the run directory (called at every save)."""

    def round_discarded(self, server_round: int, discarded: RoundDiscarded) -> None:
        """A stage further in discarded this round's aggregate."""

    def save_checkpoint(self, path: Path) -> bool:
        """Write the global adapter to `path` if this stage holds it (True), else False."""
        return False

    def load_checkpoint(self, path: Path) -> bool:
        """Resume the global adapter from `path` if this stage holds it (True)."""
        return False

    def finish(self) -> None:
        """At the end of the run, after the last round."""
