"""fedllm ServerApp: runs the rounds, checks and aggregates adapter updates, keeps the run dir.

The round loop is our own rather than `Strategy.start()`: it evaluates the initial adapter
on every site (round 0), checks every update before aggregation, records per-site metrics
and bytes on the wire, checkpoints each round and resumes. Aggregation itself is the
configured Flower strategy's `aggregate_train`, except under homomorphic aggregation, where
`server.secure_aggregation` sums ciphertexts the coordinator cannot read. With
`security.sign-updates` every reply is verified against the site's registered Ed25519 key
(`fedllm.secure.sign`) before anything in it is used; a rejected, refused or missing site is
recorded per round, and the round goes on while `run.min-sites` remain. With
`safety.screen-every` the candidate global adapter of a screening round is asked the probe
prompts (`fedllm.safety.screen`) before it is adopted; a tripped gate keeps the previous one.
"""

from __future__ import annotations

import copy
import functools
import io
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedllm.config import FedllmConfig, parse_config
from fedllm.errors import BudgetExceededError, FedllmError, InvalidUpdateError
from fedllm.model import (
    AdapterSpec,
    adapter_spec,
    init_adapter,
    load_adapter_arrays,
    save_peft_adapter,
)
from fedllm.privacy.accounting import MECHANISMS, History, epsilon_report
from fedllm.privacy.audit.directions import CanaryDirections
from fedllm.privacy.backfill import missing_spends
from fedllm.privacy.budget import check_budget
from fedllm.privacy.distributed import effective_noise_multiplier
from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger, dp_sgd_entry, user_dp_entry
from fedllm.privacy.userdp import UserDPSettings, noisy_mean_update, poisson_sample, secure_rng
from fedllm.rundir import LEDGER_FILE, RunDir, write_json_atomic
from fedllm.safety.screen import Screener, ScreenResult, gate
from fedllm.secure.at_rest import AtRestKey, configured_key
from fedllm.secure.packing import share_weight
from fedllm.secure.pki import load_registry
from fedllm.secure.sign import Claim
from fedllm.summary import build_summary, render_table
from fedllm.validate import check_update
from fedllm.wire import (
    arrays_to_record,
    record_bytes,
    record_to_arrays,
    route_fedllm_logs,
    verify_reply,
)
from server.secure_aggregation import HEAggregator
from server.strategies import build_strategy


def _fail(error: FedllmError | str) -> None:
    """One line naming what is wrong, no traceback; the run directory is left untouched."""
    log(ERROR, "fedllm: %s", error)


def create_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `overrides` (flat keys) are laid over the run config, for
    `flwr.simulation.run_simulation`, which passes no run config of its own."""
    server_app = ServerApp()
    route_fedllm_logs()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, {**context.run_config, **(overrides or {})})

    return server_app


def main(grid: Grid, run_config: dict[str, Any]) -> None:
    """Validate the config, open (or resume) the run directory and run every round."""
    try:
        cfg = parse_config(run_config)
        spec = adapter_spec(cfg.model, cfg.lora)
        run = RunDir.find(cfg)
        FederatedRun(grid, cfg, run, spec).execute()
    except FedllmError as e:
        _fail(e)


def _error_reason(text: str | None) -> str:
    """The site's own one-line message out of Flower's wrapped error text."""
    if not text:
        return "unknown error"
    text = text.strip()
    marker = "Message: "
    if marker in text:
        text = text[text.rindex(marker) + len(marker) :]
    return text.strip().splitlines()[0].rstrip("'>")


app = create_app()


def _records_name(server_round: int) -> str:
    return f"safety/round-{server_round}.json"


def _pct(rate: dict[str, Any]) -> str:
    low, high = rate["ci95"]
    return (
        f"{100 * rate['rate']:.1f}% ({rate['count']}/{rate['total']}, "
        f"95% CI {100 * low:.1f}-{100 * high:.1f}%)"
    )


def _strategy_state(strategy: Any) -> dict[str, Any]:
    """A copy of a strategy's attributes. Server optimisers keep state between rounds
    (FedAvgM's current arrays and momentum, FedAdam's moments); a rolled-back round must not
    leave its update in them."""
    return copy.deepcopy(vars(strategy))


def _restore_strategy_state(strategy: Any, saved: dict[str, Any]) -> None:
    vars(strategy).clear()
    vars(strategy).update(saved)


def _dp_label(cfg: FedllmConfig) -> str:
    parts = []
    if cfg.privacy.record_level:
        parts.append(f"record-level sigma={cfg.privacy.noise_multiplier}")
    if cfg.privacy.user_level:
        p = cfg.privacy
        where = "noise added by the sites" if _he(cfg) else f"q={cfg.strategy.fraction_train}"
        parts.append(
            f"user-level z={p.user_noise_multiplier} S={p.user_clip} ({p.user_clipping}) {where}"
        )
    return " + ".join(parts) or "off"


def _he(cfg: FedllmConfig) -> bool:
    return cfg.strategy.secure_aggregation == "he"


class FederatedRun:
    """State of one run on the server: the global adapter and what each round recorded.

    A new run's directory is only created once round 0 (evaluation of the initial adapter)
    has succeeded on enough sites, so a bad data source or an empty partition reported by
    the sites leaves nothing half-written behind.
    """

    def __init__(
        self, grid: Grid, cfg: FedllmConfig, run: RunDir | None, spec: AdapterSpec
    ) -> None:
        self.grid, self.cfg, self.run, self.spec = grid, cfg, run, spec
        self.state: dict[str, Any] = run.state if run else {"rounds_completed": 0}
        self.full = init_adapter(spec, seed=cfg.run.seed)
        self.expected = {n: spec.shapes[n] for n in spec.sent}
        self.arrays = {n: self.full[n] for n in spec.sent}
        self.num_sites = 0
        self.user_dp: UserDPSettings | None = None
        self.canary_clients = (
            CanaryDirections(cfg.audit.canary_clients, cfg.audit.canary_seed, dict(self.expected))
            if cfg.audit.canary_clients
            else None
        )
        self._user_report: dict[str, float | bool] = {}
        self.rng = secure_rng()
        # Loaded (and a secret-key context refused) before anything else happens.
        self.he = HEAggregator(cfg, dict(self.expected)) if _he(cfg) else None
        self.registry = (
            load_registry(Path(cfg.security.registry)) if cfg.security.sign_updates else None
        )
        # The probes and the filter load now, so a bad safety.* setting stops the run first.
        self.initial = dict(self.arrays)  # the base model's behaviour: B = 0
        self.screener = Screener(cfg) if cfg.safety.screens else None

    # -- bookkeeping -----------------------------------------------------------------------
    def _record(self, kind: str, server_round: int, site: str, metrics: dict[str, Any]) -> None:
        self.state.setdefault(kind, {}).setdefault(str(server_round), {})[site] = metrics

    def _save(self) -> dict[str, Any] | None:
        """Persist state and summary (atomically); returns the summary."""
        if self.run is None:
            return None
        self.run.save_state()
        summary = build_summary(self.cfg, self.state, run_dir=str(self.run.path))
        self.run.write_summary(summary)
        return summary

    @property
    def rounds_completed(self) -> int:
        return int(self.state.get("rounds_completed", 0))

    @functools.cached_property
    def at_rest(self) -> AtRestKey | None:
        """The key checkpoints and the run ledger are sealed under (security.at-rest-key)."""
        return configured_key(self.cfg.security.at_rest_key)

    def _ledger(self) -> Ledger:
        assert self.run is not None
        return Ledger(self.run.path / LEDGER_FILE, key=self.at_rest)

    def _resume(self) -> None:
        """Load the at-rest key first (a missing, readable or wrong key stops the run before
        anything runs), then the last checkpoint of a run being resumed."""
        key = self.at_rest
        self.state.setdefault("security", {})["at_rest"] = (
            {"cipher": "AES-256-GCM", "key_id": key.id} if key else None
        )
        ckpt = self.run.latest_checkpoint() if self.run else None
        if self.run is not None:
            self._ledger().records()  # a ledger sealed under another key is refused here
        if ckpt is None:
            return
        if self.he is not None:
            self.he.resume(ckpt, at_rest=key)
        else:
            saved = load_adapter_arrays(ckpt, at_rest=key)
            self.full.update(saved)
            self.arrays = {n: saved[n] for n in self.spec.sent}
        log(INFO, "fedllm: resuming %s after round %d", self.run.path, self.rounds_completed)

    def _wait_for_sites(self) -> None:
        deadline = time.monotonic() + min(self.cfg.run.timeout, 600)
        while len(list(self.grid.get_node_ids())) < self.cfg.run.min_sites:
            if time.monotonic() > deadline:
                raise FedllmError(
                    f"fewer than run.min-sites = {self.cfg.run.min_sites} sites connected."
                )
            time.sleep(1.0)
        self.num_sites = len(list(self.grid.get_node_ids()))

    def _start_new_run(self, strategy: Any) -> None:
        """Round 0 in memory; the run directory appears only if enough sites evaluated."""
        self._evaluate(strategy, 0)
        ok = len(self.state.get("evals", {}).get("0", {}))
        if ok < self.cfg.run.min_sites:
            reasons = sorted({f["reason"] for f in self.state.get("failures", [])})
            raise FedllmError(
                f"only {ok} of {self.num_sites} sites could evaluate the initial adapter "
                f"(run.min-sites = {self.cfg.run.min_sites}): {'; '.join(reasons) or 'no reply'}"
            )
        base = self._screen_base()
        self.run = RunDir.create(self.cfg, self.state)
        if base is not None:
            self._write_screen_records(0, base)
        summary = self._save()
        log(
            INFO,
            "fedllm: [round 0] initial adapter on %d sites | global eval loss %.4f",
            ok,
            summary["eval_loss"][0] if summary else float("nan"),
        )

    # -- the loop ----------------------------------------------------------------------------
    def execute(self) -> None:
        cfg = self.cfg
        self._resume()
        self._wait_for_sites()
        strategy = build_strategy(cfg, num_sites=self.num_sites)
        if (cfg.privacy.user_level or self.canary_clients is not None) and self.he is None:
            self.user_dp = self._user_dp_settings()
        if self.he is not None:
            he_state = self.state.setdefault("secure_aggregation", {"rounds": []})
            he_state.update(
                scheme="CKKS (TenSEAL), the coordinator holds only the public context",
                key_id=self.he.key,
                poly_modulus_degree=cfg.he.poly_modulus_degree,
                coeff_mod_bit_sizes=cfg.he.coeff_mod_bit_sizes,
                scale_bits=cfg.he.scale_bits,
                ciphertexts_per_update=len(self.he.packing.chunk_sizes),
            )
        self.state["security"] = {
            **self.state.get("security", {}),
            "sign_updates": cfg.security.sign_updates,
            "registry": cfg.security.registry if self.registry else None,
            "site_keys": {
                str(k): {"name": r.name, "key_id": r.key_id}
                for k, r in sorted((self.registry or {}).items())
            },
        }
        self.state["adapter"] = {
            "ffa": cfg.lora.ffa,
            "sent_tensors": len(self.arrays),
            "sent_parameters": int(sum(a.size for a in self.arrays.values())),
            **{k: v for k, v in self.state.get("adapter", {}).items() if k == "final_checkpoint"},
        }
        log(
            INFO,
            "fedllm: run %s -> %s | %d sites | %s%s | DP %s | %d tensors (%d params) travel",
            cfg.run.name,
            RunDir.path_for(cfg),
            self.num_sites,
            cfg.strategy.name,
            f" over CKKS ciphertexts (key {self.he.key[:12]})" if self.he else "",
            _dp_label(cfg),
            len(self.arrays),
            self.state["adapter"]["sent_parameters"],
        )
        self._log_safety_plan()
        if self.run is None:
            self._start_new_run(strategy)
        assert self.run is not None
        if self.screener is not None and "base" not in self.state.get("safety", {}):
            self._write_screen_records(0, self._screen_base())  # a run resumed mid-setup
            self._save()
        start_round = self.rounds_completed + 1
        if start_round > cfg.run.rounds:
            log(INFO, "fedllm: run %s already has %d rounds.", cfg.run.name, cfg.run.rounds)
        for server_round in range(start_round, cfg.run.rounds + 1):
            t0 = time.monotonic()
            log(INFO, "fedllm: [round %d/%d] training", server_round, cfg.run.rounds)
            screening = self.screener is not None and cfg.safety.screens_round(
                server_round, cfg.run.rounds
            )
            before = (self.arrays, _strategy_state(strategy)) if screening else None
            if not self._train(strategy, server_round):
                break
            gate_stops = before is not None and self._screen_round(server_round, strategy, *before)
            self._evaluate(strategy, server_round)
            self._checkpoint(server_round)
            self.state.setdefault("round_seconds", []).append(round(time.monotonic() - t0, 2))
            self.state["rounds_completed"] = server_round
            summary = self._save()
            loss = summary["eval_loss"][-1] if summary else None
            log(
                INFO,
                "fedllm: [round %d/%d] done in %.1fs | global eval loss %.4f | epsilon %s",
                server_round,
                cfg.run.rounds,
                time.monotonic() - t0,
                loss if loss is not None else float("nan"),
                {s: round(e, 3) for s, e in summary["epsilon"].items() if e is not None},
            )
            if gate_stops:
                break
        else:
            self.state["status"] = "completed"
        if self.canary_clients is not None:
            self._audit_canary_clients()
        summary = self._save()
        from fedllm.plots import plot_run

        plot_run(summary, self.run.path / "progress.png")
        console_text = io.StringIO()
        from rich.console import Console

        Console(file=console_text, width=110).print(render_table(summary))
        log(
            INFO,
            "fedllm: summary written to %s\n%s",
            self.run.path / "summary.json",
            console_text.getvalue(),
        )

    # -- content safety (safety.*) -----------------------------------------------------------
    def _log_safety_plan(self) -> None:
        if self.screener is None:
            return
        s, probes, filt = self.cfg.safety, self.screener.probes, self.screener.filter
        counts = probes.counts()
        log(
            INFO,
            "fedllm: safety screening every %d round(s): %d harmful + %d benign probes from %s, "
            "filter %s (threshold %g), gate: %s above +%g points",
            s.screen_every,
            counts["harmful"],
            counts["benign"],
            probes.source,
            filt.name,
            filt.threshold,
            s.gate_action,
            s.gate_max_rise,
        )

    def _screen_base(self) -> ScreenResult | None:
        """Round 0: the base model (the initial adapter, B = 0), the gate's reference."""
        if self.screener is None:
            return None
        result = self.screener.screen(self.initial)
        counts = self.screener.probes.counts()
        self.state["safety"] = {
            "filter": self.screener.filter.name,
            "threshold": self.screener.filter.threshold,
            "probes": self.screener.probes.source,
            "probe_counts": counts,
            "base": {"round": 0, **result.to_dict(), "records": _records_name(0)},
            "rounds": [],
            "rollbacks": [],
        }
        log(
            INFO,
            "fedllm: [round 0] safety of the base model: harmful compliance %s, benign "
            "over-refusal %s (%.1fs)",
            _pct(result.harmful_compliance.to_dict()),
            _pct(result.benign_over_refusal.to_dict()),
            result.seconds,
        )
        return result

    def _write_screen_records(self, server_round: int, result: ScreenResult | None) -> None:
        """Per-probe records go to their own file in the run dir, never into summary.json."""
        if result is None or self.run is None:
            return
        path = self.run.path / _records_name(server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path,
            {
                "round": server_round,
                "filter": self.state["safety"]["filter"],
                "threshold": self.state["safety"]["threshold"],
                "probes": self.state["safety"]["probes"],
                "records": result.records,
            },
        )

    def _screen_round(
        self,
        server_round: int,
        strategy: Any,
        previous: dict[str, np.ndarray],
        strategy_state: dict[str, Any],
    ) -> bool:
        """Screen the candidate adapter and apply safety.gate-action if the gate trips;
        returns whether the run stops here. A rolled-back round still happened: the sites
        trained, so its privacy spend stays in the ledger; only its update is not adopted."""
        assert self.screener is not None
        cfg = self.cfg.safety
        safety = self.state["safety"]
        result = self.screener.screen(self.arrays)
        decision = gate(
            safety["base"]["harmful_compliance"]["rate"],
            result.harmful_compliance.rate,
            cfg.gate_max_rise,
        )
        action = "passed"
        if decision.tripped:
            action = {"rollback": "rolled back", "stop": "rolled back, run stopped"}.get(
                cfg.gate_action, "recorded only"
            )
        if decision.tripped and cfg.gate_action in ("rollback", "stop"):
            self.arrays = previous
            _restore_strategy_state(strategy, strategy_state)
            kept = f"round {server_round - 1}" if server_round > 1 else "the initial adapter"
            safety["rollbacks"].append(
                {"round": server_round, "kept": kept, "rise_points": decision.rise_points}
            )
        safety["rounds"].append(
            {
                "round": server_round,
                **result.to_dict(),
                "gate": {**decision.to_dict(), "action": action},
                "records": _records_name(server_round),
            }
        )
        self._write_screen_records(server_round, result)
        log(
            WARNING if decision.tripped else INFO,
            "fedllm: [round %d] safety: harmful compliance %s (base %.1f%%, %+.1f points, "
            "limit +%g), benign over-refusal %s | gate %s",
            server_round,
            _pct(result.harmful_compliance.to_dict()),
            100 * decision.base_rate,
            decision.rise_points,
            cfg.gate_max_rise,
            _pct(result.benign_over_refusal.to_dict()),
            action,
        )
        if decision.tripped and cfg.gate_action == "stop":
            reason = (
                f"round {server_round}: the safety gate tripped (harmful compliance "
                f"{100 * decision.rate:.1f}% vs the base model's {100 * decision.base_rate:.1f}%, "
                f"more than safety.gate-max-rise = {cfg.gate_max_rise:g} points above it); the "
                "round's update was discarded and the run stops with the previous global adapter."
            )
            log(ERROR, "fedllm: %s", reason)
            self.state.update(status="stopped", stop_reason=reason)
            return True
        return False

    def _send(self, messages: list[Message], kind: str, server_round: int) -> list[Message]:
        down = sum(record_bytes(m.content["arrays"]) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.run.timeout))
        up = sum(
            record_bytes(r.content["arrays"])
            for r in replies
            if not r.has_error() and "arrays" in r.content.array_records
        )
        entries = self.state.setdefault("bytes", [])
        entry = next((e for e in entries if e["round"] == server_round), None)
        if entry is None:
            entry = {"round": server_round, "up": 0, "down": 0}
            entries.append(entry)
        entry["up"] += up
        entry["down"] += down
        ok = [r for r in replies if not r.has_error()]
        errors = {
            r.metadata.reply_to_message_id: _error_reason(r.error.reason)
            for r in replies
            if r.has_error()
        }
        answered = {r.metadata.src_node_id for r in ok}
        missing = [m for m in messages if m.metadata.dst_node_id not in answered]
        for m in missing:
            node = m.metadata.dst_node_id
            # A dead node's error reply comes from the SuperLink (src 1), so the node and its
            # site are named from what was sent, not from the reply.
            reason = errors.get(m.metadata.message_id) or (
                next(iter(errors.values()))
                if len(errors) == 1 and len(missing) == 1
                else f"no reply within run.timeout = {self.cfg.run.timeout:g}s"
            )
            site = self.state.get("node_sites", {}).get(str(node))
            log(
                WARNING,
                "fedllm: %s failed in %s round %d: %s",
                f"site {site} (node {node})" if site is not None else f"node {node}",
                kind,
                server_round,
                reason,
            )
            self.state.setdefault("failures", []).append(
                {"round": server_round, "phase": kind, "node": node, "site": site, "reason": reason}
            )
        return ok

    def _config(self, server_round: int) -> ConfigRecord:
        he = self.he.config(self.num_sites, self._weight_unit()) if self.he else {}
        return ConfigRecord({"run-name": self.cfg.run.name, "server-round": server_round, **he})

    def _weight_unit(self) -> float:
        """The federation's training examples, as the sites last reported them when
        evaluating: HE weights are examples / unit, public and summing to about 1."""
        evals = self.state.get("evals", {})
        for server_round in sorted(evals, key=int, reverse=True):
            counts = [m.get("train-examples", 0) for m in evals[server_round].values()]
            if sum(counts) > 0:
                return float(sum(counts))
        return 1.0

    def _payload(self) -> Any:
        """The global adapter as it travels: plaintext, or the encrypted aggregate under HE."""
        return self.he.payload(self.arrays) if self.he else arrays_to_record(self.arrays)

    def _train(self, strategy: Any, server_round: int) -> bool:
        messages = list(
            strategy.configure_train(
                server_round, self._payload(), self._config(server_round), self.grid
            )
        )
        if self.he is not None and self.cfg.privacy.user_level:
            # Best case (every noise share arrives); the sum actually formed is checked again.
            z = self.cfg.privacy.user_noise_multiplier
            if not self._user_budget_allows(server_round, z, 1.0):
                return False
        if self.user_dp is not None:
            if self.cfg.privacy.user_level and not self._user_budget_allows(
                server_round, self.user_dp.noise_multiplier, self.user_dp.sample_rate
            ):
                return False
            keep = set(
                poisson_sample(
                    [m.metadata.dst_node_id for m in messages], self.user_dp.sample_rate, self.rng
                )
            )
            messages = [m for m in messages if m.metadata.dst_node_id in keep]
            log(
                INFO,
                "fedllm: [round %d] user-level DP: %d of %d sites sampled (q=%g)",
                server_round,
                len(messages),
                self.num_sites,
                self.user_dp.sample_rate,
            )
        replies = self._send(messages, "train", server_round) if messages else []
        valid = []
        he_sum = self.he.new_sum() if self.he else None
        he_seconds = 0.0  # the coordinator's cost of checking and adding ciphertexts
        unit = self._weight_unit()  # what the sites were sent in this round's config
        for reply in replies:
            try:
                site, sender = self._accept_sender(reply, server_round, "train")
                metrics = dict(reply.content["metrics"])
                if metrics.get("refused"):
                    reason = str(reply.content["refusal"]["reason"])
                    log(
                        WARNING, "fedllm: %s left out of round %d: %s", sender, server_round, reason
                    )
                    self.state.setdefault("refused", []).append(
                        {"round": server_round, "site": site, "reason": reason}
                    )
                    continue
                self._ledger_spend(server_round, metrics)
                if he_sum is not None:
                    t0 = time.perf_counter()
                    HEAggregator.add(
                        he_sum,
                        reply,
                        sender=sender,
                        site=site,
                        expected_weight=share_weight(
                            user_level=self.cfg.privacy.user_level,
                            num_examples=int(metrics["num-examples"]),
                            unit=unit,
                            num_sites=self.num_sites,
                        ),
                    )
                    he_seconds += time.perf_counter() - t0
                else:
                    check_update(
                        record_to_arrays(reply.content["arrays"]), self.expected, sender=sender
                    )
            except (InvalidUpdateError, KeyError, ValueError) as e:
                self._reject(server_round, reply, "train", e)
                continue
            self._record("trains", server_round, str(site), metrics)
            valid.append(reply)
        needed = self.cfg.run.min_sites
        if self.user_dp is not None:  # Poisson sampling may pick fewer sites by design
            needed = min(needed, len(messages))
        if len(valid) < needed:

            def count(kind: str) -> int:
                return sum(
                    1
                    for r in self.state.get(kind, [])
                    if r["round"] == server_round and r.get("phase", "train") == "train"
                )

            reason = (
                f"round {server_round}: only {len(valid)} valid updates ({count('refused')} "
                f"sites refused for their privacy budget, {count('rejected')} updates "
                f"rejected, {count('failures')} sites did not answer), fewer than "
                f"run.min-sites = {self.cfg.run.min_sites}; stopping with the last global adapter."
            )
            log(ERROR, "fedllm: %s", reason)
            self.state.update(status="stopped", stop_reason=reason)
            return False
        if he_sum is not None:
            return self._he_commit(server_round, he_sum, he_seconds)
        if self.user_dp is not None:
            valid = [
                self._user_dp_aggregate(
                    server_round, valid, [m.metadata.dst_node_id for m in messages]
                )
            ]
        arrays, _ = strategy.aggregate_train(server_round, valid)
        self.arrays = {
            k: np.asarray(v, dtype=np.float32) for k, v in record_to_arrays(arrays).items()
        }
        return True

    def _ledger_spend(self, server_round: int, metrics: dict[str, Any]) -> None:
        """Record a site's reported spend, whether or not its update is then accepted:
        the site trained, so the privacy was spent."""
        if not self.cfg.privacy.record_level or "epsilon-prv" not in metrics:
            return
        entry = dp_sgd_entry(
            run_id=self.cfg.run.name,
            server_round=server_round,
            site=int(metrics["site"]),
            noise_multiplier=metrics["noise-multiplier"],
            sample_rate=metrics["sample-rate"],
            steps=int(metrics["steps"]),
            max_grad_norm=metrics["max-grad-norm"],
            delta=metrics["delta"],
            epsilons={m: metrics[f"epsilon-{m}"] for m in MECHANISMS},
        )
        ledger = self._ledger()
        for missing in missing_spends(
            ledger.records(),
            metrics,
            run_id=self.cfg.run.name,
            site=int(metrics["site"]),
            before_round=server_round,
        ):
            log(WARNING, "fedllm: site %s: %s", metrics["site"], missing["backfilled"])
            ledger.append(missing)
        ledger.append(entry)

    # -- user-level DP (DP-FedAvg at the server) ---------------------------------------------
    def _user_dp_settings(self) -> UserDPSettings:
        """The user-level mechanism; an auditing run's inserted canary clients count in the
        population (and so in the fixed denominator), and a non-DP auditing baseline
        (privacy.mode = 'none' with canary clients) gets the same clipped mean without noise."""
        p = self.cfg.privacy
        canaries = int(self.canary_clients.included.sum()) if self.canary_clients else 0
        return UserDPSettings(
            noise_multiplier=p.user_noise_multiplier if p.user_level else 0.0,
            clip_norm=p.user_clip,
            sample_rate=self.cfg.strategy.fraction_train,
            num_sites=self.num_sites + canaries,
            adaptive=p.user_clipping == "adaptive" and p.user_level,
            target_quantile=p.user_target_quantile,
            clip_learning_rate=p.user_clip_learning_rate,
            count_stddev=p.user_count_stddev,
            audit_baseline=not p.user_level,
        )

    def _user_history(self) -> History:
        """The run's user-level steps so far, read back from the run ledger (the source of
        truth: a resumed run continues it without counting a round twice)."""
        if self.run is None:
            return []
        records = self._ledger().records()
        return [
            (r["noise_multiplier"], r["sample_rate"], r["steps"])
            for r in records
            if r.get("mechanism") == USER_GAUSSIAN
        ]

    def _user_budget_allows(self, server_round: int, z: float, q: float) -> bool:
        """Refuse a round that would take the user-level ε past its budget (stop cleanly)."""
        p = self.cfg.privacy
        try:
            self._user_report = check_budget(
                self._user_history(),
                (z, q, 1),
                delta=p.user_delta,
                budget=p.user_epsilon_max or None,
                who="user-level DP (every site)",
            )
        except BudgetExceededError as e:
            reason = f"round {server_round}: {e} The run stops with the last global adapter."
            log(ERROR, "fedllm: %s", reason)
            self.state.update(status="stopped", stop_reason=reason)
            return False
        return True

    def _he_commit(self, server_round: int, total: Any, seconds: float = 0.0) -> bool:
        """Make the round's encrypted sum the global adapter, after accounting the noise the
        sites' shares actually put in it (distributed DP). Nothing leaves the server before
        the ledger record is durable; a round it cannot account honestly is not released."""
        assert self.he is not None and self.run is not None
        cfg, n = self.cfg, self.num_sites
        present = len(total.contributors)
        entry: dict[str, Any] = {
            "round": server_round,
            "contributors": sorted(total.contributors),
            "total_weight": total.weight,
            "server_seconds": round(seconds, 4),
            "site_seconds": {
                site: round(float(m["he-seconds"]), 4)
                for site, m in self.state.get("trains", {}).get(str(server_round), {}).items()
                if "he-seconds" in m
            },
        }
        he_state = self.state.setdefault("secure_aggregation", {"rounds": []})
        if cfg.privacy.user_level:
            if present < n and cfg.he.on_dropout == "abort":
                reason = (
                    f"round {server_round}: {present} of {n} sites' noise shares arrived and "
                    "he.on-dropout = 'abort'; the sum is discarded unread and the global "
                    "adapter stays as it was."
                )
                log(WARNING, "fedllm: %s", reason)
                he_state["rounds"].append({**entry, "aborted": reason})
                return True
            z = effective_noise_multiplier(cfg.privacy.user_noise_multiplier, present, n)
            if not self._user_budget_allows(server_round, z, 1.0):
                return False
            self._he_ledger(server_round, total, z)
            entry["noise_multiplier"] = z
        t0 = time.perf_counter()
        self.he.commit(total)
        entry["server_seconds"] = round(seconds + time.perf_counter() - t0, 4)
        entry["ciphertext_bytes"] = self.he.ciphertext_bytes()
        he_state["rounds"].append(entry)
        log(
            INFO,
            "fedllm: [round %d] summed %d encrypted updates (%d ciphertexts each, %.1f MB) "
            "without decrypting; total weight %g",
            server_round,
            present,
            len(self.he.packing.chunk_sizes),
            entry["ciphertext_bytes"] / 1e6,
            total.weight,
        )
        return True

    def _he_ledger(self, server_round: int, total: Any, z: float) -> None:
        """The user-level record of a distributed-noise round, at the noise present."""
        p, n = self.cfg.privacy, self.num_sites
        report = self._user_report
        present = len(total.contributors)
        entry = user_dp_entry(
            run_id=self.cfg.run.name,
            server_round=server_round,
            noise_multiplier=z,
            update_noise_multiplier=z,
            sample_rate=1.0,
            clip_norm=p.user_clip,
            clipping="fixed",
            sampled_sites=sorted(total.contributors),
            contributors=present,
            expected_sites=float(n),
            delta=p.user_delta,
            epsilons={m: float(report[m]) for m in MECHANISMS},
            sampling="every site every round (q = 1)",
            noise="distributed: each site adds N(0, sigma^2 S^2 / n) before encrypting",
            planned_noise_multiplier=p.user_noise_multiplier,
            noise_shares=f"{present}/{n}",
            assumption=(
                "every contributing site is honest and added its noise share; the "
                "coordinator, which sums ciphertexts, does not collude with any site"
            ),
        )
        self._ledger().append(entry)
        self.state.setdefault("user_dp", {}).setdefault("rounds", []).append(
            {
                "round": server_round,
                "sampled": n,
                "contributors": present,
                "clip_norm": p.user_clip,
                "noise": "distributed",
                "noise_multiplier": z,
                "epsilon": float(report["epsilon"]),
                "epsilon_by_accountant": {m: float(report[m]) for m in MECHANISMS},
            }
        )
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

    def _user_dp_aggregate(
        self, server_round: int, replies: list[Message], sampled: list[int]
    ) -> Message:
        """Clip each site's delta, noise the sum, record the spend, and hand the strategy one
        reply holding global + noisy mean (FedAdam & co. then treat it as post-processing)."""
        assert self.user_dp is not None and self.run is not None
        user = self.state.setdefault("user_dp", {})
        clip = float(user.get("clip_norm", self.cfg.privacy.user_clip))
        deltas = [
            {n: v - self.arrays[n] for n, v in record_to_arrays(r.content["arrays"]).items()}
            for r in replies
        ]
        canaries: list[int] = []
        extra = None
        if self.canary_clients is not None:
            canaries = self.canary_clients.sample(self.user_dp.sample_rate, self.rng)
            extra = self.canary_clients.contribution(canaries, clip)
        out = noisy_mean_update(
            deltas, self.expected, self.user_dp, clip, self.rng, extra_sum=extra
        )
        sites = sorted(int(r.content["metrics"]["site"]) for r in replies)
        report = self._user_report
        if self.cfg.privacy.user_level:
            entry = user_dp_entry(
                run_id=self.cfg.run.name,
                server_round=server_round,
                noise_multiplier=self.user_dp.noise_multiplier,
                update_noise_multiplier=self.user_dp.update_noise_multiplier,
                sample_rate=self.user_dp.sample_rate,
                clip_norm=clip,
                clipping=self.cfg.privacy.user_clipping,
                sampled_sites=sites,
                contributors=out.contributors,
                expected_sites=self.user_dp.expected_sites,
                delta=self.cfg.privacy.user_delta,
                epsilons={m: float(report[m]) for m in MECHANISMS},
            )
            # Durable before the noisy aggregate exists anywhere but in this process.
            self._ledger().append(entry)
        user["clip_norm"] = out.next_clip_norm
        user.setdefault("rounds", []).append(
            {
                "round": server_round,
                "sampled": len(sampled),
                "contributors": out.contributors,
                "canary_clients": len(canaries),
                "clipped": out.clipped,
                "clip_norm": clip,
                "update_norms": [round(x, 6) for x in out.norms],
                "noise_std": out.update_noise_std,
                "epsilon": float(report["epsilon"]) if report else None,
                "epsilon_by_accountant": {m: float(report[m]) for m in MECHANISMS}
                if report
                else {},
            }
        )
        log(
            INFO,
            "fedllm: [round %d] clipped mean of %d site updates (+%d canary clients) at norm "
            "%.4g (%d were larger), noise std %.4g per coordinate, user-level epsilon %s",
            server_round,
            out.contributors,
            len(canaries),
            clip,
            out.clipped,
            out.update_noise_std,
            f"{float(report['epsilon']):.4f} (delta {self.cfg.privacy.user_delta:g})"
            if report
            else "none (non-DP auditing baseline)",
        )
        noisy = {n: self.arrays[n] + out.mean_update[n] for n in self.arrays}
        content = RecordDict(
            {"arrays": arrays_to_record(noisy), "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(
            content=content, dst_node_id=sampled[0] if sampled else 0, message_type="train"
        )

    def _audit_canary_clients(self) -> None:
        """Andrew et al.'s estimate from the final adapter, beside the proven user-level ε;
        an estimate above the proven ε is logged as the bug it would be."""
        import math

        assert self.canary_clients is not None and self.run is not None
        initial = init_adapter(self.spec, seed=self.cfg.run.seed)
        delta = {n: self.arrays[n] - initial[n] for n in self.expected}
        result = self.canary_clients.estimate(delta, delta_dp=self.cfg.privacy.user_delta)
        # From the ledger, not this process's last budget check: a resumed run that had
        # nothing left to train never made one.
        history = self._user_history()
        proven = (
            float(epsilon_report(history, delta=self.cfg.privacy.user_delta)["epsilon"])
            if history
            else math.inf
        )
        result["proven_epsilon"] = proven if math.isfinite(proven) else None
        bug = float(result["epsilon_lower_bound"]) > proven
        result["status"] = "BUG" if bug else "consistent"
        path = self.run.path / "audit" / "canary-clients.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        self.state["canary_clients_audit"] = result
        level = ERROR if bug else INFO
        log(
            level,
            "fedllm: canary clients: user-level epsilon lower bound %.4f (estimate %.4f, "
            "mu %.3f) vs proven %s%s",
            result["epsilon_lower_bound"],
            result["epsilon_estimate"],
            result["mu"],
            f"{proven:.4f}" if math.isfinite(proven) else "none (no DP)",
            " -- BUG: the empirical bound exceeds the proven epsilon" if bug else "",
        )

    def _evaluate(self, strategy: Any, server_round: int) -> None:
        messages = list(
            strategy.configure_evaluate(
                server_round, self._payload(), self._config(server_round), self.grid
            )
        )
        for reply in self._send(messages, "evaluate", server_round):
            try:
                site, _ = self._accept_sender(reply, server_round, "evaluate")
            except (InvalidUpdateError, KeyError, ValueError) as e:
                self._reject(server_round, reply, "evaluate", e)
                continue
            self._record("evals", server_round, str(site), dict(reply.content["metrics"]))

    def _accept_sender(self, reply: Message, server_round: int, phase: str) -> tuple[int, str]:
        """The site a reply comes from, once its signature checks out (under
        security.sign-updates); remembers the node each site answers from, so a site that
        later drops out is named in the summary."""
        site = int(reply.content["metrics"]["site"])
        node = reply.metadata.src_node_id
        sender = f"site {site} (node {node})"
        if self.registry is not None:
            registered = self.registry.get(site)
            if registered is None:
                raise InvalidUpdateError(
                    f"{sender}: no signing key for partition {site} in "
                    f"{self.cfg.security.registry}; register the site with `fedllm pki init`."
                )
            claim = Claim(self.grid.run.run_id, server_round, node, phase)
            t0 = time.perf_counter()
            verify_reply(reply.content, registered, claim, sender=sender)
            security = self.state["security"]
            seconds = security.setdefault("verify_seconds", {})
            seconds[str(server_round)] = seconds.get(str(server_round), 0.0) + (
                time.perf_counter() - t0
            )
            verified = security.setdefault("verified", {})
            verified.setdefault(str(server_round), {}).setdefault(phase, []).append(site)
        self.state.setdefault("node_sites", {})[str(node)] = site
        return site, sender

    def _reject(self, server_round: int, reply: Message, phase: str, error: Exception) -> None:
        log(WARNING, "fedllm: rejected %s reply: %s", phase, error)
        try:  # the site it claims to be (named even when its signature failed)
            site: int | None = int(reply.content["metrics"]["site"])
        except (KeyError, ValueError, TypeError):
            site = None
        sender = f"site {site} (node {reply.metadata.src_node_id})"
        self.state.setdefault("rejected", []).append(
            {
                "round": server_round,
                "phase": phase,
                "site": site,
                "sender": sender if site is not None else f"node {reply.metadata.src_node_id}",
                "reason": str(error),
            }
        )

    def _checkpoint(self, server_round: int) -> None:
        path = self.run.checkpoint_dir(server_round)
        if self.he is not None:  # the server never holds the global adapter in plaintext
            self.he.save(path, at_rest=self.at_rest)
        else:
            self.full.update(self.arrays)
            save_peft_adapter(
                path,
                self.full,
                model_cfg=self.cfg.model,
                lora_cfg=self.cfg.lora,
                at_rest=self.at_rest,
            )
        self.state["adapter"]["final_checkpoint"] = str(path)
