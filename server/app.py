"""fedllm ServerApp: runs the rounds, checks and aggregates adapter updates, keeps the run dir.

The round loop is our own rather than `Strategy.start()`: it evaluates the initial adapter
on every site (round 0), checks every update before aggregation, records per-site metrics
and bytes on the wire, checkpoints each round and resumes. Aggregation itself is the
configured Flower strategy's `aggregate_train`.
"""

from __future__ import annotations

import io
import sys
import time
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedllm.config import FedllmConfig, parse_config
from fedllm.errors import FedllmError, InvalidUpdateError
from fedllm.model import AdapterSpec, adapter_spec, init_adapter, save_peft_adapter
from fedllm.records import arrays_to_record, record_bytes, record_to_arrays
from fedllm.rundir import RunDir
from fedllm.summary import build_summary, render_table
from fedllm.validate import check_update
from server.strategies import build_strategy



def _fail(error: FedllmError) -> None:
    """One line naming what is wrong, no traceback; the run directory is left untouched."""
    log(ERROR, "fedllm: %s", error)
    sys.exit(2)


def create_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `overrides` (flat keys) are laid over the run config, for
    `flwr.simulation.run_simulation`, which passes no run config of its own."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, {**context.run_config, **(overrides or {})})

    return server_app


def main(grid: Grid, run_config: dict[str, Any]) -> None:
    """Validate the config, open (or resume) the run directory and run every round."""
    try:
        cfg = parse_config(run_config)
        spec = adapter_spec(cfg.model, cfg.lora)
        run = RunDir.open(cfg)
    except FedllmError as e:
        _fail(e)
        return
    FederatedRun(grid, cfg, run, spec).execute()


app = create_app()


class FederatedRun:
    """State of one run on the server: the global adapter and what each round recorded."""

    def __init__(self, grid: Grid, cfg: FedllmConfig, run: RunDir, spec: AdapterSpec) -> None:
        self.grid, self.cfg, self.run, self.spec = grid, cfg, run, spec
        self.full = init_adapter(spec, seed=cfg.run.seed)
        self.expected = {n: spec.shapes[n] for n in spec.sent}
        self.arrays = {n: self.full[n] for n in spec.sent}
        self.num_sites = 0

    # -- bookkeeping -----------------------------------------------------------------------
    def _record(self, kind: str, server_round: int, site: str, metrics: dict[str, Any]) -> None:
        self.run.state.setdefault(kind, {}).setdefault(str(server_round), {})[site] = metrics

    def _summary(self) -> dict[str, Any]:
        summary = build_summary(self.cfg, self.run.state, run_dir=str(self.run.path))
        self.run.write_summary(summary)
        return summary

    def _resume(self) -> None:
        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            return
        from safetensors.numpy import load_file

        saved = load_file(str(ckpt / "adapter_model.safetensors"))
        self.full.update(saved)
        self.arrays = {n: saved[n] for n in self.spec.sent}
        log(INFO, "fedllm: resuming %s after round %d", self.run.path, self.run.rounds_completed)

    def _wait_for_sites(self) -> None:
        deadline = time.monotonic() + min(self.cfg.run.timeout, 600)
        while len(list(self.grid.get_node_ids())) < self.cfg.run.min_sites:
            if time.monotonic() > deadline:
                raise FedllmError(
                    f"fewer than run.min-sites = {self.cfg.run.min_sites} sites connected."
                )
            time.sleep(1.0)
        self.num_sites = len(list(self.grid.get_node_ids()))

    # -- the loop ----------------------------------------------------------------------------
    def execute(self) -> None:
        cfg = self.cfg
        self._resume()
        self._wait_for_sites()
        strategy = build_strategy(cfg, num_sites=self.num_sites)
        log(
            INFO,
            "fedllm: run %s -> %s | %d sites | %s | DP %s | %d tensors (%d params) travel",
            cfg.run.name,
            self.run.path,
            self.num_sites,
            cfg.strategy.name,
            f"sigma={cfg.privacy.noise_multiplier}" if cfg.privacy.enabled else "off",
            len(self.arrays),
            sum(a.size for a in self.arrays.values()),
        )
        self.run.state["adapter"] = {
            "ffa": cfg.lora.ffa,
            "sent_tensors": len(self.arrays),
            "sent_parameters": int(sum(a.size for a in self.arrays.values())),
        }
        if self.run.rounds_completed == 0 and "0" not in self.run.state.get("evals", {}):
            self._evaluate(strategy, 0)
            self.run.save_state()
        start_round = self.run.rounds_completed + 1
        if start_round > cfg.run.rounds:
            log(INFO, "fedllm: run %s already has %d rounds.", cfg.run.name, cfg.run.rounds)
        for server_round in range(start_round, cfg.run.rounds + 1):
            t0 = time.monotonic()
            log(INFO, "fedllm: [round %d/%d] training", server_round, cfg.run.rounds)
            if not self._train(strategy, server_round):
                break
            self._evaluate(strategy, server_round)
            self._checkpoint(server_round)
            self.run.state.setdefault("round_seconds", []).append(round(time.monotonic() - t0, 2))
            self.run.state["rounds_completed"] = server_round
            self.run.save_state()
            summary = self._summary()
            loss = summary["eval_loss"][-1]
            log(
                INFO,
                "fedllm: [round %d/%d] done in %.1fs | global eval loss %.4f | epsilon %s",
                server_round,
                cfg.run.rounds,
                time.monotonic() - t0,
                loss if loss is not None else float("nan"),
                {s: round(e, 3) for s, e in summary["epsilon"].items() if e is not None},
            )
        else:
            self.run.state["status"] = "completed"
        self.run.save_state()
        summary = self._summary()
        console_text = io.StringIO()
        from rich.console import Console

        Console(file=console_text, width=110).print(render_table(summary))
        log(INFO, "fedllm: summary written to %s\n%s", self.run.path / "summary.json",
            console_text.getvalue())

    def _send(self, messages: list[Message], kind: str, server_round: int) -> list[Message]:
        down = sum(record_bytes(m.content["arrays"]) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.run.timeout))
        up = sum(
            record_bytes(r.content["arrays"])
            for r in replies
            if not r.has_error() and "arrays" in r.content.array_records
        )
        entries = self.run.state.setdefault("bytes", [])
        entry = next((e for e in entries if e["round"] == server_round), None)
        if entry is None:
            entry = {"round": server_round, "up": 0, "down": 0}
            entries.append(entry)
        entry["up"] += up
        entry["down"] += down
        for r in replies:
            if r.has_error():
                reason = r.error.reason.strip().splitlines()[-1] if r.error.reason else "unknown"
                log(WARNING, "fedllm: node %d failed in %s: %s", r.metadata.src_node_id, kind, reason)
                self.run.state.setdefault("failures", []).append(
                    {"round": server_round, "phase": kind, "node": r.metadata.src_node_id,
                     "reason": reason}
                )
        return [r for r in replies if not r.has_error()]

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({"run-name": self.cfg.run.name, "server-round": server_round})

    def _train(self, strategy: Any, server_round: int) -> bool:
        messages = list(
            strategy.configure_train(
                server_round, arrays_to_record(self.arrays), self._config(server_round), self.grid
            )
        )
        replies = self._send(messages, "train", server_round)
        valid = []
        for reply in replies:
            sender = f"node {reply.metadata.src_node_id}"
            try:
                metrics = dict(reply.content["metrics"])
                sender = f"site {int(metrics['site'])} ({sender})"
                check_update(record_to_arrays(reply.content["arrays"]), self.expected, sender=sender)
            except (InvalidUpdateError, KeyError) as e:
                log(WARNING, "fedllm: rejected update: %s", e)
                self.run.state.setdefault("rejected", []).append(
                    {"round": server_round, "sender": sender, "reason": str(e)}
                )
                continue
            self._record("trains", server_round, str(int(metrics["site"])), metrics)
            valid.append(reply)
        if len(valid) < self.cfg.run.min_sites:
            reason = (
                f"round {server_round}: only {len(valid)} valid updates, fewer than "
                f"run.min-sites = {self.cfg.run.min_sites}; stopping with the last global adapter."
            )
            log(ERROR, "fedllm: %s", reason)
            self.run.state.update(status="stopped", stop_reason=reason)
            return False
        arrays, _ = strategy.aggregate_train(server_round, valid)
        self.arrays = {k: np.asarray(v, dtype=np.float32) for k, v in record_to_arrays(arrays).items()}
        return True

    def _evaluate(self, strategy: Any, server_round: int) -> None:
        messages = list(
            strategy.configure_evaluate(
                server_round, arrays_to_record(self.arrays), self._config(server_round), self.grid
            )
        )
        for reply in self._send(messages, "evaluate", server_round):
            metrics = dict(reply.content["metrics"])
            self._record("evals", server_round, str(int(metrics["site"])), metrics)

    def _checkpoint(self, server_round: int) -> None:
        self.full.update(self.arrays)
        path = self.run.checkpoint_dir(server_round)
        save_peft_adapter(path, self.full, model_cfg=self.cfg.model, lora_cfg=self.cfg.lora)
        self.run.state["adapter"]["final_checkpoint"] = str(path)
