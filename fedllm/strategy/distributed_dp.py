"""Distributed DP under HE: each site adds its share N(0, z² S² / n) of the Gaussian noise
before encrypting (`fedllm.mods.distributed_dp`), so no party ever holds the noise-free sum.
This stage accounts the noise the shares that actually arrived put in the sum, and nothing
leaves the coordinator before that ledger record is durable: a round it cannot account
honestly is not released (`he.on-dropout`: "abort" discards it, "account" records the
smaller multiplier that is really present)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.privacy.accounting import MECHANISMS
from fedllm.privacy.distributed import curious_site_noise_multiplier, effective_noise_multiplier
from fedllm.privacy.ledger import user_dp_entry
from fedllm.strategy.base import RoundDiscarded, Stage
from fedllm.strategy.user_dp import user_budget
from fedllm.summary import user_level_section
from fedllm.wire import reply_site

__all__ = ["DistributedDP"]


class DistributedDP(Stage):
    """User-level DP-FedAvg whose noise the sites add; the coordinator only accounts it."""

    name = "distributed-dp"
    state_keys = ("user_dp",)
    summary_keys = ("user_level",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.strategy.secure_aggregation == "he" and cfg.privacy.user_level

    def summary_section(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {"user_level": user_level_section(self.cfg, self.state.get("user_dp", {}))}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        # Best case (every noise share arrives); the sum actually formed is checked again.
        n = self.ctx.num_sites
        user_budget(self.ctx, server_round, self.multipliers(n, n)[0], 1.0)
        return messages

    def multipliers(self, present: int, n: int) -> tuple[float, float, float]:
        """(accounted, all shares, against a curious site) noise multipliers of a sum of
        `present` shares: the accounted one follows he.noise-assumption."""
        z = self.cfg.privacy.user_noise_multiplier
        every = effective_noise_multiplier(z, present, n)
        curious = curious_site_noise_multiplier(z, present, n)
        honest = self.cfg.he.noise_assumption == "honest-sites"
        return (every if honest else curious), every, curious

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.account(server_round, sorted(reply_site(r.content) for r in replies))
        return self.inner.aggregate_train(server_round, replies)

    def account(self, server_round: int, contributors: list[int]) -> float:
        """Record the round at the noise its `contributors`' shares put in the sum and
        return that multiplier; raises `RoundDiscarded` (he.on-dropout = "abort", shares
        missing) or `RunStopped` (the budget does not allow the noise actually present)."""
        cfg, n = self.cfg, self.ctx.num_sites
        p = cfg.privacy
        present = len(contributors)
        if present < n and cfg.he.on_dropout == "abort":
            reason = (
                f"round {server_round}: {present} of {n} sites' noise shares arrived and "
                "he.on-dropout = 'abort'; the sum is discarded unread and the global "
                "adapter stays as it was."
            )
            log(WARNING, "fedllm: %s", reason)
            raise RoundDiscarded(reason)
        z, every, curious = self.multipliers(present, n)
        report = user_budget(self.ctx, server_round, z, 1.0)
        entry = user_dp_entry(
            run_id=cfg.run.name,
            server_round=server_round,
            noise_multiplier=z,
            update_noise_multiplier=z,
            sample_rate=1.0,
            clip_norm=p.user_clip,
            clipping="fixed",
            expected_sites=float(n),
            delta=p.user_delta,
            epsilons={m: float(report[m]) for m in MECHANISMS},
            sampling="every site every round (q = 1)",
            noise="distributed: each site adds N(0, sigma^2 S^2 / n) before encrypting",
            planned_noise_multiplier=p.user_noise_multiplier,
            noise_shares=f"{present}/{n}",
            noise_multiplier_all_shares=every,
            noise_multiplier_curious_site=curious,
            noise_assumption=self.cfg.he.noise_assumption,
            assumption=(
                "every contributing site added its noise share and the coordinator, which "
                "sums ciphertexts, colludes with no site; "
                + (
                    "no site looks at the sum without its own share (honest-sites)"
                    if self.cfg.he.noise_assumption == "honest-sites"
                    else "a site may subtract its own share (curious-site): accounted at "
                    "the other shares only"
                )
            ),
        )
        self.ctx.ledger().append_once(entry)  # once: see `user_history`
        self.state.setdefault("user_dp", {}).setdefault("rounds", []).append(
            {
                "round": server_round,
                "sampled": n,
                "contributors": present,
                "clip_norm": p.user_clip,
                "noise": "distributed",
                "noise_multiplier": z,
                "noise_multiplier_all_shares": every,
                "noise_multiplier_curious_site": curious,
                "epsilon": float(report["epsilon"]),
                "epsilon_by_accountant": {m: float(report[m]) for m in MECHANISMS},
            }
        )
        self.ctx.notes["noise_multiplier"] = z
        log(
            INFO,
            "fedllm: [round %d] distributed DP: %d of %d noise shares -> z = %.4f, user-level "
            "epsilon %.4f (delta %g)",
            server_round,
            present,
            n,
            z,
            float(report["epsilon"]),
            p.user_delta,
        )
        return z
