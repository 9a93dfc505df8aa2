"""The safety gate (`safety.screen-every`): before the candidate global adapter of a
screening round is adopted, the coordinator asks it the probe prompts and scores the
answers (`fedllm.safety.screen`). If harmful compliance rises above the base model's by
more than `safety.gate-max-rise` points with 95% confidence (the lower end of the rise's
Newcombe interval; 0, the default, trips on any rise the probes can tell from noise), the
round is rolled back (the previous adapter and the server optimiser's state are kept; the
sites' privacy spend stays in the ledger), stopped, or only recorded. Each round's record
says the rise and its interval; the smallest rise these probes could detect at all is
computed once, from the base model's rate."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.rundir import RunDir, write_json_atomic
from fedllm.safety.screen import Rate, Screener, ScreenResult, detectable_rise, gate
from fedllm.strategy.base import RoundDiscarded, RunContext, Stage
from fedllm.summary import safety_section
from fedllm.wire import record_to_arrays

__all__ = ["SafetyGate"]


def _pct(rate: dict[str, Any]) -> str:
    low, high = rate["ci95"]
    return (
        f"{100 * rate['rate']:.1f}% ({rate['count']}/{rate['total']}, "
        f"95% CI {100 * low:.1f}-{100 * high:.1f}%)"
    )


class SafetyGate(Stage):
    """Screens the candidate adapter of every screening round, and the base model once."""

    name = "safety-gate"
    state_keys = ("safety",)
    summary_keys = ("safety",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.safety.screens

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        # The probes and the filter load now, so a bad safety.* setting stops the run first.
        self.screener = Screener(self.cfg) if self.active else None
        self.initial = dict(ctx.arrays)  # the base model's behaviour: B = 0
        self._pending: dict[int, ScreenResult] = {}
        self._saved: dict[str, Any] | None = None

    def summary_section(self) -> dict[str, Any]:
        return {
            "safety": safety_section(self.cfg, self.state.get("safety", {}), self.ctx.book.data)
        }

    def begin(self) -> None:
        if self.screener is None:
            return
        s, probes, filt = self.cfg.safety, self.screener.probes, self.screener.filter
        counts = probes.counts()
        log(
            INFO,
            "fedllm: safety screening every %d round(s): %d harmful + %d benign probes from %s, "
            "filter %s (threshold %g), gate: %s when the rise's 95%% interval is above +%g points",
            s.screen_every,
            counts["harmful"],
            counts["benign"],
            probes.source,
            filt.name,
            filt.threshold,
            s.gate_action,
            s.gate_max_rise,
        )

    def ready(self) -> None:
        """Round 0: the base model (the initial adapter, B = 0), the gate's reference;
        screened once, after the sites evaluated it (a resumed run that lacks it screens it
        now)."""
        if self.screener is None or "base" in self.state.get("safety", {}):
            return
        result = self.screener.screen(self.initial)
        detectable = detectable_rise(result.harmful_compliance, self.cfg.safety.gate_max_rise)
        self.state["safety"] = {
            "filter": self.screener.filter.name,
            "threshold": self.screener.filter.threshold,
            "probes": self.screener.probes.source,
            "probe_counts": self.screener.probes.counts(),
            "base": {"round": 0, **result.to_dict(), "records": RunDir.safety_records_name(0)},
            "rounds": [],
            "rollbacks": [],
            "detectable_rise_points": detectable,
        }
        self._pending[0] = result
        log(
            INFO,
            "fedllm: [round 0] safety of the base model: harmful compliance %s, benign "
            "over-refusal %s (%.1fs); the gate can detect a rise of %s",
            _pct(result.harmful_compliance.to_dict()),
            _pct(result.benign_over_refusal.to_dict()),
            result.seconds,
            f"{detectable:.1f} points or more" if detectable is not None else "no size",
        )

    def write_files(self, run: RunDir) -> None:
        """Per-probe records go to their own file in the run dir, never into summary.json."""
        safety = self.state.get("safety", {})
        for server_round, result in sorted(self._pending.items()):
            path = run.safety_records_path(server_round)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                path,
                {
                    "round": server_round,
                    "filter": safety["filter"],
                    "threshold": safety["threshold"],
                    "probes": safety["probes"],
                    "records": result.records,
                },
            )
        self._pending.clear()

    def _screens(self, server_round: int) -> bool:
        return self.cfg.safety.screens_round(server_round, self.cfg.run.rounds)

    def snapshot_inner(self) -> None:
        """A copy of the inner strategy's attributes. Server optimisers keep state between
        rounds (FedAvgM's current arrays and momentum, FedAdam's moments); a rolled-back
        round must not leave its update in them. The stages further in (the streaming mean)
        keep nothing between rounds, so the Flower strategy at the end of the chain is what
        is copied."""
        self._saved = copy.deepcopy(vars(self.flower))

    def _restore_inner(self) -> None:
        assert self._saved is not None
        vars(self.flower).clear()
        vars(self.flower).update(self._saved)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._screens(server_round):
            self.snapshot_inner()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is not None and self._screens(server_round):
            candidate = {
                k: np.asarray(v, dtype=np.float32) for k, v in record_to_arrays(arrays).items()
            }
            self.screen_candidate(server_round, candidate)
        return arrays, metrics

    def screen_candidate(self, server_round: int, candidate: dict[str, np.ndarray]) -> None:
        """Screen the candidate adapter and apply safety.gate-action if the gate trips:
        raises `RoundDiscarded` (with `stop` for "stop") when the round's update must not be
        adopted. A rolled-back round still happened: the sites trained, so its privacy
        spend stays in the ledger; only its update is not adopted."""
        assert self.screener is not None
        cfg = self.cfg.safety
        safety = self.state["safety"]
        result = self.screener.screen(candidate)
        base = safety["base"]["harmful_compliance"]
        decision = gate(
            Rate(int(base["count"]), int(base["total"]), *map(float, base["ci95"])),
            result.harmful_compliance,
            cfg.gate_max_rise,
        )
        action = "passed"
        rolls_back = decision.tripped and cfg.gate_action in ("rollback", "stop")
        if decision.tripped:
            action = {"rollback": "rolled back", "stop": "rolled back, run stopped"}.get(
                cfg.gate_action, "recorded only"
            )
        if rolls_back:
            self._restore_inner()
            kept = f"round {server_round - 1}" if server_round > 1 else "the initial adapter"
            safety["rollbacks"].append(
                {"round": server_round, "kept": kept, "rise_points": decision.rise_points}
            )
        safety["rounds"].append(
            {
                "round": server_round,
                **result.to_dict(),
                "gate": {**decision.to_dict(), "action": action},
                "records": RunDir.safety_records_name(server_round),
            }
        )
        self._pending[server_round] = result
        log(
            WARNING if decision.tripped else INFO,
            "fedllm: [round %d] safety: harmful compliance %s (base %.1f%%, %+.1f points, "
            "95%% CI [%+.1f, %+.1f], trips above +%g), benign over-refusal %s | gate %s",
            server_round,
            _pct(result.harmful_compliance.to_dict()),
            100 * decision.base_rate,
            decision.rise_points,
            *decision.rise_ci95_points,
            cfg.gate_max_rise,
            _pct(result.benign_over_refusal.to_dict()),
            action,
        )
        if not rolls_back:
            return
        if cfg.gate_action == "stop":
            reason = (
                f"round {server_round}: the safety gate tripped (harmful compliance "
                f"{100 * decision.rate:.1f}% vs the base model's {100 * decision.base_rate:.1f}%: "
                f"a rise whose 95% interval, [{decision.rise_ci95_points[0]:+.1f}, "
                f"{decision.rise_ci95_points[1]:+.1f}] points, lies above safety.gate-max-rise = "
                f"{cfg.gate_max_rise:g}); the "
                "round's update was discarded and the run stops with the previous global adapter."
            )
            log(ERROR, "fedllm: %s", reason)
            raise RoundDiscarded(reason, stop=True)
        raise RoundDiscarded(f"round {server_round}: the safety gate rolled the round back")
