"""fedllm ClientApp: a site trains the LoRA adapter on its private data and sends only that.

Thin by design: the handlers read the config and the context, call `fedllm.site` and pack a
plaintext reply. Each site appends every DP-SGD spend to its own hash-chained ledger (fsync'd
before the update leaves) and reports its cumulative ε. What is done to a request and a reply
(the site's policy, distributed-DP noise share, HE, signature) is `fedllm.mods`."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm import wire as w
from fedllm.config import FedllmConfig
from fedllm.errors import BudgetExceededError, PolicyRefusedError
from fedllm.mods import reply_mods, train_mods
from fedllm.mods.context import local_data, partition, site_config
from fedllm.mods.policy import site_budget, site_policy
from fedllm.privacy.backfill import history_metrics
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import configured_key
from fedllm.site import PrivacyState, run_evaluate, run_train, site_data_for, spend_record

log = logging.getLogger("fedllm.client")
w.route_fedllm_logs()


def create_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp in its mods; `overrides` (flat keys) are laid over the run config (tests)."""
    extra = dict(overrides or {})
    client_app = ClientApp(mods=reply_mods(extra))
    client_app.train(mods=train_mods(extra))(partial(_train, overrides=extra))
    client_app.evaluate()(partial(_evaluate, overrides=extra))
    return client_app


def train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """One training round as the SuperNode runs it, mods included (for apps that wrap it)."""
    return create_app(overrides)(msg, context)


def evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """One evaluation as the SuperNode runs it, mods included (for apps that wrap it)."""
    return create_app(overrides)(msg, context)


def _site_ledger(cfg: FedllmConfig, context: Context, site: int) -> Ledger:
    """This site's ledger (under the node config's `state-dir`, if given), sealed under its
    `at-rest-key`, else security.at-rest-key (a bad key stops it before training)."""
    root = context.node_config.get("state-dir")
    base = Path(str(root)) / cfg.run.name if root else Path(cfg.run.output_dir) / cfg.run.name
    key = configured_key(str(context.node_config.get("at-rest-key") or cfg.security.at_rest_key))
    return Ledger(RunDir.site_ledger_path(base, site), key=key)


def _train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Train one round; reply with the trainable adapter tensors and the privacy spend."""
    cfg, config = site_config(msg, context, overrides), msg.content[w.CONFIG]
    site, num_sites = partition(context)
    data, tokenizer = site_data_for(cfg, site=site, num_sites=num_sites, local=local_data(context))
    ledger = _site_ledger(cfg, context, data.site)
    policy = site_policy(context)  # PolicyMod has checked what the request states
    try:
        out = run_train(
            cfg,
            data,
            w.record_to_arrays(msg.content[w.ARRAYS]),  # plaintext: HEMod opened it
            PrivacyState.from_ledger(ledger.records()),
            pad_token_id=int(tokenizer.pad_token_id),
            proximal_mu=float(config.get(w.PROXIMAL_MU, 0.0)),
            budget=site_budget(cfg, context, policy),
            policy=policy,
        )
    except (BudgetExceededError, PolicyRefusedError) as e:
        # A refusal is an answer, not a failure: the server leaves this site out and says why.
        log.warning("%s", e)
        return Message(content=w.refusal_content(data.site, str(e)), reply_to=msg)
    record_level = cfg.privacy.record_level
    if record_level:  # the spend is durable at the site before the update leaves it
        server_round = int(config.get(w.SERVER_ROUND, 0))
        ledger.append(spend_record(cfg, out, site=data.site, server_round=server_round))
    metrics = MetricRecord(
        w.train_metrics(
            out,
            site=data.site,
            max_grad_norm=cfg.privacy.max_grad_norm if record_level else 0.0,
            history=history_metrics(ledger.records()) if record_level else {},
        )
    )
    if cfg.safety.screen_site_data:  # a count only: the flagged examples stay at the site
        metrics[w.SAFETY_DROPPED] = data.safety_dropped
    loss = out.result.mean_loss
    log.info("site %d: round trained, loss %.4f, epsilon %.4f", data.site, loss, out.epsilon)
    content = RecordDict({w.ARRAYS: w.arrays_to_record(out.arrays), w.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def _evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Evaluate the global adapter on this site's held-out split."""
    cfg = site_config(msg, context, overrides)
    site, num_sites = partition(context)
    data, tokenizer = site_data_for(cfg, site=site, num_sites=num_sites, local=local_data(context))
    arrays = w.record_to_arrays(msg.content[w.ARRAYS])  # plaintext: HEMod opened it
    res = run_evaluate(cfg, data, arrays, pad_token_id=int(tokenizer.pad_token_id))
    metrics = w.evaluate_metrics(res, site=data.site, train_examples=data.num_records)
    return Message(content=RecordDict({w.METRICS: MetricRecord(metrics)}), reply_to=msg)


app = create_app()
