"""fedllm ClientApp: a site trains the LoRA adapter on its private data and sends only that.

Thin by design: the handlers read the config and the context, call `fedllm.site` and pack a
plaintext reply. Each site appends every DP-SGD spend to its own hash-chained ledger (fsync'd
before the update leaves) and reports its cumulative ε. What is done to a request and a reply
(the site's policy, distributed-DP noise share, HE, signature) is `fedllm.mods`."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm import wire as w
from fedllm.config import config_hash
from fedllm.errors import BudgetExceededError, PolicyRefusedError
from fedllm.mods import reply_mods, train_mods
from fedllm.mods.context import site_config, site_inputs
from fedllm.mods.policy import site_limits
from fedllm.mods.sign import signing_key
from fedllm.privacy.backfill import history_metrics
from fedllm.site import join_refusal, run_evaluate, run_train
from fedllm.site_ledgers import SiteLedgers
from fedllm.site_replay import ReplyStore, fresh_reply, request_digest

log = logging.getLogger("fedllm.client")
w.route_fedllm_logs()


def create_app(overrides: dict[str, Any] | None = None, *, inner_mods: tuple = ()) -> ClientApp:
    """The ClientApp in its mods; `overrides` (flat keys) are laid over the run config (tests);
    `inner_mods` wrap the train handler innermost (a simulated attacker: benchmarks/attacks.py)."""
    extra = dict(overrides or {})
    client_app = ClientApp(mods=reply_mods(extra))
    client_app.train(mods=[*train_mods(extra), *inner_mods])(partial(_train, overrides=extra))
    client_app.evaluate()(partial(_evaluate, overrides=extra))
    return client_app


def train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """One message (the app routes train and evaluate) as the SuperNode runs it, mods
    included (for apps that wrap it)."""
    return create_app(overrides)(msg, context)


evaluate = train


def _train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Train one round; reply with the trainable adapter tensors and the privacy spend. The
    same request asked again (a resumed coordinator) gets the stored reply (`site_replay`)."""
    cfg, config = site_config(msg, context, overrides), msg.content[w.CONFIG]
    data, tokenizer, own = site_inputs(cfg, context)  # own base model: PolicyMod checked it
    ledgers = SiteLedgers.open(  # every record it writes is signed with the site's key
        cfg, context.node_config, site=data.site, fingerprint=data.fingerprint,
        signing_key=signing_key(cfg, context, data.site),
    )  # fmt: skip
    server_round = int(config.get(w.SERVER_ROUND, 0))
    proximal_mu = float(config.get(w.PROXIMAL_MU, 0.0))
    global_arrays = w.record_to_arrays(msg.content[w.ARRAYS])  # plaintext: HEMod opened it
    store, digest = ReplyStore.beside(ledgers.run), request_digest(
        config_sha256=config_hash(cfg), data_fingerprint=data.fingerprint,
        server_round=server_round, proximal_mu=proximal_mu, arrays=global_arrays,
    )  # fmt: skip
    done = store.load(digest)
    if done is None:
        try:  # PolicyMod has checked what the request states; this checks what it would spend
            out = run_train(
                cfg, data, global_arrays, ledgers.run_state(),
                pad_token_id=int(tokenizer.pad_token_id), proximal_mu=proximal_mu,
                limits=site_limits(cfg, context), lifetime=ledgers.lifetime_history(),
                base_model=own,
            )  # fmt: skip
        except (BudgetExceededError, PolicyRefusedError) as e:
            # A refusal is an answer, not a failure: the server leaves this site out and says why.
            log.warning("%s", e)
            return Message(content=w.refusal_content(data.site, str(e)), reply_to=msg)
        done = fresh_reply(cfg, data, out, server_round)
        store.save(digest, done)  # before the spend: see fedllm.site_replay
    else:
        log.info("site %d: round %d asked again: its stored reply", data.site, server_round)
    stored = None  # the site's signed record of its spend, which the reply carries
    if done.spend is not None:  # the spend is durable at the site before the update leaves it
        stored = ledgers.append_once(done.spend)
    history = history_metrics(ledgers.run.records()) if done.spend is not None else {}
    content = RecordDict(
        {
            w.ARRAYS: w.arrays_to_record(done.arrays),
            w.METRICS: MetricRecord({**done.metrics, **history}),
        }
    )
    return Message(
        content=w.with_spend_record(content, stored) if stored else content, reply_to=msg
    )


def _evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Evaluate the global adapter on this site's held-out split."""
    cfg = site_config(msg, context, overrides)
    data, tokenizer, own = site_inputs(cfg, context)  # own base model: PolicyMod checked it
    ledgers = SiteLedgers.open(
        cfg, context.node_config, site=data.site, fingerprint=data.fingerprint
    )
    state = ledgers.run_state()
    if not state.history:  # its first request of this run: could it train one round of it?
        limits, lifetime = site_limits(cfg, context), ledgers.lifetime_history()
        if reason := join_refusal(cfg, data, state, limits=limits, lifetime=lifetime):
            log.warning("%s", reason)  # a run it could not train in: it answers nothing
            return Message(content=w.refusal_content(data.site, reason), reply_to=msg)
    arrays = w.record_to_arrays(msg.content[w.ARRAYS])  # plaintext: HEMod opened it
    pad = int(tokenizer.pad_token_id)
    res = run_evaluate(cfg, data, arrays, pad_token_id=pad, base_model=own)
    metrics = w.evaluate_metrics(res, site=data.site, train_examples=data.num_records)
    return Message(content=RecordDict({w.METRICS: MetricRecord(metrics)}), reply_to=msg)


app = create_app()
