"""Which stages a run has, in which order, around which inner Flower strategy.

`STAGES` is the order of the wrappers, outermost first: a reply meets them in this order,
so a signature is checked before anything in the reply is used, a spend is recorded before
the update is validated (the site trained, so the privacy was spent), and an update is
validated before any mechanism touches it. A new mechanism is one new stage file and one
`register_stage` call; the loop never changes.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fedllm.strategy.base import RoundDiscarded, RunContext, Stage
from fedllm.strategy.decode import Decode
from fedllm.strategy.distributed_dp import DistributedDP
from fedllm.strategy.eval_cohort import EvalCohort
from fedllm.strategy.flower import build_inner
from fedllm.strategy.he_sum import HESum
from fedllm.strategy.manifest import Manifest
from fedllm.strategy.norm_bound import NormBound
from fedllm.strategy.robust import RobustRule
from fedllm.strategy.safety_gate import SafetyGate
from fedllm.strategy.signatures import Signatures
from fedllm.strategy.spends import Spends
from fedllm.strategy.streaming import StreamingMean
from fedllm.strategy.user_dp import UserDP
from fedllm.strategy.validate import Validate

__all__ = ["STAGES", "Pipeline", "register_stage", "unregister_stage"]

STAGES: list[type[Stage]] = [
    Signatures,
    Spends,
    Decode,
    Validate,
    EvalCohort,
    NormBound,
    DistributedDP,
    HESum,
    UserDP,
    SafetyGate,
    RobustRule,
    StreamingMean,
    Manifest,
]


def register_stage(
    stage: type[Stage], *, after: str | None = None, force: bool = False
) -> type[Stage]:
    """Add a stage to every run built from now on: right after the stage named `after`, or
    innermost (next to the Flower strategy). A name already registered is refused unless
    `force` replaces it."""
    if not stage.name:
        raise ValueError(f"stage {stage.__name__} has no name.")
    known = [s.name for s in STAGES]
    if stage.name in known:
        if not force:
            raise ValueError(f"a stage named {stage.name!r} is already registered.")
        STAGES.pop(known.index(stage.name))
        known.remove(stage.name)
    if after is None:
        STAGES.append(stage)
    elif after not in known:
        raise ValueError(f"no stage named {after!r}; known stages: {', '.join(known)}.")
    else:
        STAGES.insert(known.index(after) + 1, stage)
    return stage


def unregister_stage(name: str) -> None:
    """Remove a registered stage (tests restore the registry with it)."""
    STAGES[:] = [s for s in STAGES if s.name != name]


class Pipeline:
    """Every registered stage of one run (all write their summary sections and state); the
    enabled ones wrap the inner strategy, outermost first."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.stages: tuple[Stage, ...] = tuple(cls(ctx) for cls in STAGES)
        self.active: tuple[Stage, ...] = tuple(s for s in self.stages if s.active)
        ctx.sampled_by_design = any(s.samples_sites for s in self.active)
        self.strategy: Strategy | None = None

    def build(self, inner: Strategy | None = None) -> Strategy:
        """Chain the enabled stages around `inner` (by default the configured Flower
        strategy, built for the sites now connected); returns the outermost."""
        ctx = self.ctx
        chain = inner or build_inner(
            ctx.cfg, num_sites=ctx.num_sites, sample_all=ctx.sampled_by_design
        )
        for stage in reversed(self.active):
            chain = stage.wrap(chain)
        self.strategy = chain
        return chain

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    # -- the life-cycle hooks, over every stage ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.stages:
            out.update(s.state_dict())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s in self.stages:
            s.load_state_dict(state)

    def summary_sections(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.stages:
            out.update(s.summary_section())
        return out

    def plan(self) -> str:
        return "".join(f" {p}" for s in self.active if (p := s.plan()))

    def begin(self) -> None:
        for s in self.active:
            s.begin()

    def ready(self) -> None:
        for s in self.active:
            s.ready()

    def round_discarded(self, server_round: int, discarded: RoundDiscarded) -> None:
        for s in self.active:
            s.round_discarded(server_round, discarded)

    def finish(self) -> None:
        for s in self.active:
            s.finish()
