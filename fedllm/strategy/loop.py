"""`FederatedRun`: the coordinator's loop. Resume, round 0, the rounds, checkpoint, stop.

It knows no mechanism: everything a round does to messages and replies is a stage of
`fedllm.strategy.pipeline` around the configured Flower strategy, and a stage ends a round
by raising (`RunStopped`, `RoundDiscarded`). The loop is our own rather than Flower's
`Strategy.start()` because it evaluates the initial adapter on every site (round 0), keeps
the run directory (checkpoint each round, resume after the last completed one) and writes
the summary after every round.
"""

from __future__ import annotations

import io
import time
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm.config import FedllmConfig
from fedllm.errors import FedllmError
from fedllm.model import AdapterSpec, init_adapter, load_adapter_arrays, save_peft_adapter
from fedllm.plots import plot_run
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import configured_key
from fedllm.strategy.base import RoundDiscarded, RunContext, RunStopped
from fedllm.strategy.book import RunBook
from fedllm.strategy.pipeline import Pipeline
from fedllm.strategy.transport import Transport
from fedllm.summary import build_summary, render_table
from fedllm.wire import RUN_NAME, SERVER_ROUND, arrays_to_record, is_encrypted, record_to_arrays

__all__ = ["FederatedRun"]

# The loop's own keys in state.json; the book and each stage own the others.
LOOP_KEYS = (
    "rounds_completed",
    "trained_round",
    "status",
    "stop_reason",
    "round_seconds",
    "adapter",
)


def _dp_label(cfg: FedllmConfig) -> str:
    parts = []
    p = cfg.privacy
    if p.record_level:
        parts.append(f"record-level sigma={p.noise_multiplier}")
    if p.user_level:
        he = cfg.strategy.secure_aggregation == "he"
        where = "noise added by the sites" if he else f"q={cfg.strategy.fraction_train}"
        parts.append(
            f"user-level z={p.user_noise_multiplier} S={p.user_clip} ({p.user_clipping}) {where}"
        )
    return " + ".join(parts) or "off"


class FederatedRun:
    """One run on the coordinator: the global adapter, the run's book and its stages.

    A new run's directory is only created once round 0 (evaluation of the initial adapter)
    has succeeded on enough sites, so a bad data source or an empty partition reported by
    the sites leaves nothing half-written behind. Every stage is built here, so a missing
    registry, an HE context holding the secret key or a bad safety setting stops the run
    before it waits for any site.
    """

    def __init__(
        self,
        grid: Grid | None,
        cfg: FedllmConfig,
        run: RunDir | None,
        spec: AdapterSpec,
        *,
        config_sha256: str = "",
    ) -> None:
        state = run.state if run else {"rounds_completed": 0}
        self.cfg, self.spec = cfg, spec
        self.full = init_adapter(spec, seed=cfg.run.seed)
        self.ctx = RunContext(
            cfg=cfg,
            spec=spec,
            book=RunBook(state),
            grid=grid,
            run=run,
            arrays={n: self.full[n] for n in spec.sent},
            config_sha256=config_sha256,
        )
        self.state: dict[str, Any] = {k: state[k] for k in LOOP_KEYS if k in state}
        self.pipeline = Pipeline(self.ctx)
        self.pipeline.load_state_dict(state)
        self.strategy: Strategy | None = None

    @property
    def rounds_completed(self) -> int:
        return int(self.state.get("rounds_completed", 0))

    # -- the run directory --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything `state.json` holds: the loop's keys, the book's and every stage's."""
        return {**self.state, **self.ctx.book.state_dict(), **self.pipeline.state_dict()}

    def summary(self) -> dict[str, Any]:
        run_dir = str(self.ctx.run.path) if self.ctx.run else ""
        return build_summary(
            self.cfg,
            self.state_dict(),
            run_dir=run_dir,
            sections=self.pipeline.summary_sections(),
        )

    def _save(self) -> dict[str, Any] | None:
        """Persist the stages' files, then state and summary (atomically); the summary."""
        run = self.ctx.run
        if run is None:
            return None
        run.state = self.state_dict()  # what the stages' files (the manifest) describe
        for stage in self.pipeline.active:
            stage.write_files(run)
        run.state = self.state_dict()
        run.save_state()
        summary = self.summary()
        run.write_summary(summary)
        return summary

    def _resume(self) -> None:
        """Load the at-rest key first (a missing, readable or wrong key stops the run before
        anything runs), then the last checkpoint of a run being resumed."""
        self.ctx.at_rest = configured_key(self.cfg.security.at_rest_key)
        run = self.ctx.run
        if run is None:
            return
        self.ctx.ledger().records()  # a ledger sealed under another key is refused here
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            return
        if not any(stage.load_checkpoint(ckpt) for stage in self.pipeline.active):
            saved = load_adapter_arrays(ckpt, at_rest=self.ctx.at_rest)
            self.full.update(saved)
            self.ctx.arrays = {n: saved[n] for n in self.spec.sent}
        log(INFO, "fedllm: resuming %s after round %d", run.path, self.rounds_completed)

    def _checkpoint(self, server_round: int) -> None:
        assert self.ctx.run is not None
        path = self.ctx.run.checkpoint_dir(server_round)
        if not any(stage.save_checkpoint(path) for stage in self.pipeline.active):
            self.full.update(self.ctx.arrays)
            save_peft_adapter(
                path,
                self.full,
                model_cfg=self.cfg.model,
                lora_cfg=self.cfg.lora,
                at_rest=self.ctx.at_rest,
            )
        self.state["adapter"]["final_checkpoint"] = str(path)

    # -- sites ----------------------------------------------------------------------------------
    def _wait_for_sites(self) -> None:
        grid = self.ctx.grid
        assert grid is not None
        deadline = time.monotonic() + min(self.cfg.run.timeout, 600)
        while len(list(grid.get_node_ids())) < self.cfg.run.min_sites:
            if time.monotonic() > deadline:
                raise FedllmError(
                    f"fewer than run.min-sites = {self.cfg.run.min_sites} sites connected."
                )
            time.sleep(1.0)
        self.ctx.num_sites = len(list(grid.get_node_ids()))

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({RUN_NAME: self.cfg.run.name, SERVER_ROUND: server_round})

    def _train(self, server_round: int) -> None:
        """One training round through the stages; raises what a stage raises."""
        assert self.strategy is not None and self.ctx.grid is not None
        payload = arrays_to_record(self.ctx.arrays)
        messages = list(
            self.strategy.configure_train(
                server_round, payload, self._config(server_round), self.ctx.grid
            )
        )
        # Streaming: each reply is pulled, checked and folded before the next (the stages
        # pass replies on one at a time); otherwise the round's replies are collected first.
        receive = self.transport.stream if self.cfg.strategy.streaming else self.transport.send
        arrays, _ = self.strategy.aggregate_train(
            server_round, receive(messages, "train", server_round)
        )
        if arrays is not None and not is_encrypted(arrays):  # under HE the stage holds it
            self.ctx.arrays = {
                k: np.asarray(v, dtype=np.float32) for k, v in record_to_arrays(arrays).items()
            }

    def _evaluate(self, server_round: int) -> None:
        assert self.strategy is not None and self.ctx.grid is not None
        messages = list(
            self.strategy.configure_evaluate(
                server_round,
                arrays_to_record(self.ctx.arrays),
                self._config(server_round),
                self.ctx.grid,
            )
        )
        self.strategy.aggregate_evaluate(
            server_round, self.transport.send(messages, "evaluate", server_round)
        )

    def _start_new_run(self) -> None:
        """Round 0 in memory; the run directory appears only if enough sites evaluated."""
        self._evaluate(0)
        ok = len(self.ctx.book.round("evals", 0))
        cohort = self.cfg.eval.sites or self.cfg.run.min_sites  # eval.sites: only they evaluate
        if ok < min(self.cfg.run.min_sites, cohort):
            book = self.ctx.book.data
            reasons = sorted(
                {f"{_sender(f)}: {f['reason']}" for f in book.get("failures", [])}
                | {f"site {r['site']} refused: {r['reason']}" for r in book.get("refused", [])}
            )
            raise FedllmError(
                f"only {ok} of {self.ctx.num_sites} sites could evaluate the initial adapter "
                f"(run.min-sites = {self.cfg.run.min_sites}): {'; '.join(reasons) or 'no reply'}"
            )
        self.pipeline.ready()
        self.ctx.run = RunDir.create(self.cfg, self.state_dict())
        summary = self._save()
        log(
            INFO,
            "fedllm: [round 0] initial adapter on %d sites | global eval loss %.4f",
            ok,
            summary["eval_loss"][0] if summary else float("nan"),
        )

    def _stop(self, reason: str) -> None:
        self.state.update(status="stopped", stop_reason=reason)

    # -- the loop -----------------------------------------------------------------------------
    def execute(self) -> None:
        cfg = self.cfg
        self._resume()
        self._wait_for_sites()
        assert self.ctx.grid is not None
        self.transport = Transport(self.ctx.grid, self.ctx.book, timeout=cfg.run.timeout)
        self.strategy = self.pipeline.build()
        self.pipeline.begin()
        self.state["adapter"] = {
            "ffa": cfg.lora.ffa,
            "sent_tensors": len(self.ctx.arrays),
            "sent_parameters": int(sum(a.size for a in self.ctx.arrays.values())),
            **{k: v for k, v in self.state.get("adapter", {}).items() if k == "final_checkpoint"},
        }
        log(
            INFO,
            "fedllm: run %s -> %s | %d sites | %s%s | DP %s | %d tensors (%d params) travel",
            cfg.run.name,
            RunDir.path_for(cfg),
            self.ctx.num_sites,
            cfg.strategy.name,
            self.pipeline.plan(),
            _dp_label(cfg),
            len(self.ctx.arrays),
            self.state["adapter"]["sent_parameters"],
        )
        if self.ctx.run is None:
            self._start_new_run()
        else:
            self.pipeline.ready()  # e.g. a run resumed mid-setup screens its base model now
            self._save()
        self._rounds()
        self.pipeline.finish()
        summary = self._save()
        assert summary is not None and self.ctx.run is not None
        plot_run(summary, self.ctx.run.progress_plot_path)
        log(
            INFO,
            "fedllm: summary written to %s\n%s",
            self.ctx.run.summary_path,
            _table_text(summary),
        )

    def _train_round(self, server_round: int) -> bool:
        """Train one round and make it durable before anything leaves the coordinator: its
        checkpoint, then `trained_round` in state.json. A coordinator killed before that
        point redoes the round (the sites replay their stored replies and each spend stays
        one ledger record); killed after it, the resumed run adopts this aggregate. True
        when the round's discard stops the run after it is evaluated."""
        stops_after = False
        try:
            self._train(server_round)
        except RoundDiscarded as discarded:
            self.pipeline.round_discarded(server_round, discarded)
            if discarded.stop:
                self._stop(discarded.reason)
                stops_after = True
        self._checkpoint(server_round)
        self.state["trained_round"] = server_round
        self._save()
        return stops_after

    def _rounds(self) -> None:
        cfg = self.cfg
        start_round = self.rounds_completed + 1
        if start_round > cfg.run.rounds:
            log(INFO, "fedllm: run %s already has %d rounds.", cfg.run.name, cfg.run.rounds)
        for server_round in range(start_round, cfg.run.rounds + 1):
            t0 = time.monotonic()
            self.ctx.notes.clear()
            if self.state.get("trained_round") == server_round:
                # Trained (and checkpointed) before the coordinator stopped: the aggregate
                # may already have gone out for evaluation, so it is adopted, never redrawn.
                log(INFO, "fedllm: [round %d] trained before the stop: evaluating", server_round)
                stops_after = self.state.get("status") == "stopped"
            else:
                log(INFO, "fedllm: [round %d/%d] training", server_round, cfg.run.rounds)
                try:
                    stops_after = self._train_round(server_round)
                except RunStopped as stop:
                    self._stop(stop.reason)
                    return
            self._evaluate(server_round)
            self.state.setdefault("round_seconds", []).append(round(time.monotonic() - t0, 2))
            self.state["rounds_completed"] = server_round
            self.state.pop("trained_round", None)  # only ever the round in progress
            summary = self._save()
            assert summary is not None
            loss = summary["eval_loss"][-1]
            log(
                INFO,
                "fedllm: [round %d/%d] done in %.1fs | global eval loss %.4f | epsilon %s",
                server_round,
                cfg.run.rounds,
                time.monotonic() - t0,
                loss if loss is not None else float("nan"),
                _epsilons(summary["epsilon"]),
            )
            if stops_after:
                return
        self.state["status"] = "completed"


def _epsilons(epsilon: dict[str, float | None]) -> str:
    """Each site's ε for the round's log line; beyond a dozen sites, the largest and how many
    (a thousand sites' figures would make the line unreadable; summary.json has them all)."""
    known = {s: round(e, 3) for s, e in epsilon.items() if e is not None}
    if len(known) <= 12:
        return str(known)
    site = max(known, key=lambda s: known[s])
    return f"max {known[site]} (site {site}) over {len(known)} sites"


def _sender(failure: dict[str, Any]) -> str:
    """Who failed: the site, where its node has answered before, else the node."""
    site = failure.get("site")
    return f"site {site}" if site is not None else f"node {failure.get('node')}"


def _table_text(summary: dict[str, Any]) -> str:
    # heavy: rich's console loads only at the end of a run
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=110).print(render_table(summary))
    return out.getvalue()
