"""User-level DP (DP-FedAvg at the server): Poisson-sample the sites, clip each site's whole
update, noise the sum with a fixed denominator, and record the spend in the run ledger
before the noisy aggregate exists anywhere but in this process. An auditing run's canary
clients (`audit.canary-clients`) are inserted here too, and audited at the end."""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import ERROR, INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.errors import BudgetExceededError
from fedllm.model import init_adapter
from fedllm.privacy.accounting import MECHANISMS, History, epsilon_report
from fedllm.privacy.audit.directions import CanaryDirections
from fedllm.privacy.budget import check_budget
from fedllm.privacy.ledger import USER_GAUSSIAN, user_dp_entry
from fedllm.privacy.userdp import (
    WITHHELD,
    UserDPSettings,
    noisy_mean_update,
    poisson_sample,
    secure_rng,
)
from fedllm.rundir import RunDir, write_json_atomic
from fedllm.strategy.base import RunContext, RunStopped, Stage
from fedllm.strategy.streaming import one_reply
from fedllm.summary import participation_withheld, user_level_section
from fedllm.wire import ARRAYS, record_to_arrays

__all__ = ["UserDP", "user_budget", "user_history"]


def user_history(ctx: RunContext, *, before_round: int | None = None) -> History:
    """The run's user-level steps so far (before `before_round`, if given), read back from
    the run ledger (the source of truth: a resumed run continues it without counting a
    round twice).

    A round being computed leaves its own earlier record out: one is there only if an
    attempt at this round died before the round became durable (`fedllm.strategy.loop`),
    whose noisy sum never left the coordinator; the redone round then states that same
    step again and `Ledger.append_once` keeps one record of it."""
    if ctx.run is None:
        return []
    return [
        (r["noise_multiplier"], r["sample_rate"], r["steps"])
        for r in ctx.ledger().records()
        if r.get("mechanism") == USER_GAUSSIAN
        and (before_round is None or int(r["round"]) < before_round)
    ]


def user_budget(ctx: RunContext, server_round: int, z: float, q: float) -> dict[str, Any]:
    """The user-level ε report after one more step at (z, q); raises `RunStopped` when that
    would take the run past privacy.user-epsilon-max."""
    p = ctx.cfg.privacy
    try:
        return check_budget(
            user_history(ctx, before_round=server_round),
            (z, q, 1),
            delta=p.user_delta,
            budget=p.user_epsilon_max or None,
            who="user-level DP (every site)",
        )
    except BudgetExceededError as e:
        reason = f"round {server_round}: {e} The run stops with the last global adapter."
        log(ERROR, "fedllm: %s", reason)
        raise RunStopped(reason) from e


class UserDP(Stage):
    """DP-FedAvg over whole sites, or the same clipped mean without noise for a non-DP
    canary-client auditing baseline (privacy.mode = "none" with audit.canary-clients)."""

    name = "user-dp"
    state_keys = ("user_dp", "canary_clients_audit")
    summary_keys = ("user_level", "audit")
    samples_sites = True

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        he = cfg.strategy.secure_aggregation == "he"
        return (cfg.privacy.user_level or cfg.audit.canary_clients > 0) and not he

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        a = self.cfg.audit
        self.canary_clients = (
            CanaryDirections(a.canary_clients, a.canary_seed, dict(ctx.expected))
            if a.canary_clients and self.active
            else None
        )
        self.rng = secure_rng()
        self.settings: UserDPSettings | None = None
        self.report: dict[str, Any] = {}
        self.sampled: list[int] = []  # this round's, in memory only (never recorded)
        if participation_withheld(self.cfg):
            ctx.book.withhold_participation()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As the base class does; a round recorded before `WITHHELD` was withheld loses
        those keys, so a resumed run's state.json no longer carries them."""
        super().load_state_dict(state)
        for r in self.state.get("user_dp", {}).get("rounds", []):
            if isinstance(r, dict):
                for key in WITHHELD:
                    r.pop(key, None)

    def begin(self) -> None:
        """The mechanism; an auditing run's inserted canary clients count in the population
        (and so in the fixed denominator)."""
        p = self.cfg.privacy
        canaries = int(self.canary_clients.included.sum()) if self.canary_clients else 0
        self.settings = UserDPSettings(
            noise_multiplier=p.user_noise_multiplier if p.user_level else 0.0,
            clip_norm=p.user_clip,
            sample_rate=self.cfg.strategy.fraction_train,
            num_sites=self.ctx.num_sites + canaries,
            adaptive=p.user_clipping == "adaptive" and p.user_level,
            target_quantile=p.user_target_quantile,
            clip_learning_rate=p.user_clip_learning_rate,
            count_stddev=p.user_count_stddev,
            audit_baseline=not p.user_level,
        )

    def summary_section(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.active:
            out["user_level"] = user_level_section(self.cfg, self.state.get("user_dp", {}))
        if "canary_clients_audit" in self.state:
            out["audit"] = {"canary_clients": self.state["canary_clients_audit"]}
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        assert self.settings is not None
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.cfg.privacy.user_level:
            self.report = user_budget(
                self.ctx, server_round, self.settings.noise_multiplier, self.settings.sample_rate
            )
        keep = set(
            poisson_sample(
                [m.metadata.dst_node_id for m in messages], self.settings.sample_rate, self.rng
            )
        )
        self.sampled = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id in keep]
        log(
            INFO,
            "fedllm: [round %d] user-level DP: sites Poisson-sampled at q=%g (%g expected); "
            "which and how many are not released",
            server_round,
            self.settings.sample_rate,
            self.settings.expected_sites,
        )
        return [m for m in messages if m.metadata.dst_node_id in keep]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, [self.noisy_mean(server_round, replies)])

    def noisy_mean(self, server_round: int, replies: Iterable[Message]) -> Message:
        """Clip each site's delta, noise the sum, record the spend, and hand the strategy one
        reply holding global + noisy mean (FedAdam & co. then treat it as post-processing)."""
        assert self.settings is not None
        current = self.ctx.arrays
        user = self.state.setdefault("user_dp", {})
        clip = float(user.get("clip_norm", self.cfg.privacy.user_clip))
        deltas = (  # one at a time: each is clipped and added as its reply arrives
            {n: v - current[n] for n, v in record_to_arrays(r.content[ARRAYS]).items()}
            for r in replies
        )
        canaries: list[int] = []
        extra = None
        if self.canary_clients is not None:
            canaries = self.canary_clients.sample(self.settings.sample_rate, self.rng)
            extra = self.canary_clients.contribution(canaries, clip)
        out = noisy_mean_update(
            deltas, self.ctx.expected, self.settings, clip, self.rng, extra_sum=extra
        )
        report = self.report
        if self.cfg.privacy.user_level:
            # The accountant needs z, q and δ; neither which sites were sampled nor how many
            # contributed is recorded (see WITHHELD): under Poisson sampling the count is not
            # protected, and the fixed denominator q·N (public) replaces it in the mechanism.
            entry = user_dp_entry(
                run_id=self.cfg.run.name,
                server_round=server_round,
                noise_multiplier=self.settings.noise_multiplier,
                update_noise_multiplier=self.settings.update_noise_multiplier,
                sample_rate=self.settings.sample_rate,
                clip_norm=clip,
                clipping=self.cfg.privacy.user_clipping,
                expected_sites=self.settings.expected_sites,
                delta=self.cfg.privacy.user_delta,
                epsilons={m: float(report[m]) for m in MECHANISMS},
            )
            # Durable before the noisy aggregate exists anywhere but in this process; once,
            # if a redone round states the same step (see `user_history`).
            self.ctx.ledger().append_once(entry)
        user["clip_norm"] = out.next_clip_norm
        released = {
            "round": server_round,
            "canary_clients": len(canaries),  # virtual sites of an audit, not real ones
            "clip_norm": clip,
            "noise_std": out.update_noise_std,
            "epsilon": float(report["epsilon"]) if report else None,
            "epsilon_by_accountant": {m: float(report[m]) for m in MECHANISMS} if report else {},
        }
        if out.noisy_clipped is not None:  # adaptive clipping: the released (noised) count
            released["clipped_noisy"] = out.noisy_clipped
        user.setdefault("rounds", []).append(released)
        log(
            INFO,
            "fedllm: [round %d] %s at clip norm %.4g, noise std %.4g per coordinate%s%s, "
            "user-level epsilon %s",
            server_round,
            "noisy mean released" if report else "clipped mean",
            clip,
            out.update_noise_std,
            f", noisy clipped count {out.noisy_clipped:.2f}"
            if out.noisy_clipped is not None
            else "",
            f", {len(canaries)} canary clients" if self.canary_clients is not None else "",
            f"{float(report['epsilon']):.4f} (delta {self.cfg.privacy.user_delta:g})"
            if report
            else "none (non-DP auditing baseline)",
        )
        noisy = {n: current[n] + out.mean_update[n] for n in current}
        return one_reply(noisy, weight=1, node=self.sampled[0] if self.sampled else 0)

    def finish(self) -> None:
        if self.canary_clients is not None and self.ctx.run is not None:
            self._audit_canary_clients(self.ctx.run)

    def _audit_canary_clients(self, run: RunDir) -> None:
        """Andrew et al.'s estimate from the final adapter, beside the proven user-level ε;
        an estimate above the proven ε is logged as the bug it would be."""
        assert self.canary_clients is not None
        initial = init_adapter(self.ctx.spec, seed=self.cfg.run.seed)
        delta = {n: self.ctx.arrays[n] - initial[n] for n in self.ctx.expected}
        result = self.canary_clients.estimate(delta, delta_dp=self.cfg.privacy.user_delta)
        # From the ledger, not this process's last budget check: a resumed run that had
        # nothing left to train never made one.
        history = user_history(self.ctx)
        proven = (
            float(epsilon_report(history, delta=self.cfg.privacy.user_delta)["epsilon"])
            if history
            else math.inf
        )
        result["proven_epsilon"] = proven if math.isfinite(proven) else None
        bug = float(result["epsilon_lower_bound"]) > proven
        result["status"] = "BUG" if bug else "consistent"
        path = run.canary_clients_audit_path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        self.state["canary_clients_audit"] = result
        log(
            ERROR if bug else INFO,
            "fedllm: canary clients: user-level epsilon lower bound %.4f (estimate %.4f, "
            "mu %.3f) vs proven %s%s",
            result["epsilon_lower_bound"],
            result["epsilon_estimate"],
            result["mu"],
            f"{proven:.4f}" if math.isfinite(proven) else "none (no DP)",
            " -- BUG: the empirical bound exceeds the proven epsilon" if bug else "",
        )
