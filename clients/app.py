"""fedllm ClientApp: a site trains the LoRA adapter on its private data and sends only that.

Thin by design: it reads Flower records and context, calls `fedllm.site`, and packs the
reply. Each site writes every DP-SGD spend to its own hash-chained ledger (fsync'd before the
update leaves) and rebuilds its history from it, so the ε it reports is its cumulative spend
over the whole run, resumed runs included. Under homomorphic aggregation the site decrypts
the global adapter and encrypts what it sends (`fedllm.secure.he_site`); the coordinator never
sees either in plaintext. With `security.sign-updates` every reply (train, refusal,
evaluate) is signed with the site's Ed25519 key over the run, round, node and a digest of the
whole payload, so the coordinator can prove which site sent it. With `safety.screen-site-data`
the site drops the training examples its safety filter flags before training (`fedllm.site`)
and reports only how many (`safety-dropped`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.config import FedllmConfig, parse_config
from fedllm.errors import BudgetExceededError, ProtectionUnavailableError
from fedllm.privacy.accounting import MECHANISMS
from fedllm.privacy.backfill import history_metrics
from fedllm.privacy.budget import effective_budget
from fedllm.privacy.distributed import noisy_clipped_contribution
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.userdp import secure_rng
from fedllm.secure.at_rest import configured_key
from fedllm.secure.he import payload_digest
from fedllm.secure.he_site import SiteHE
from fedllm.secure.packing import share_weight
from fedllm.secure.pki import load_signing_key
from fedllm.secure.sign import Claim
from fedllm.site import (
    PrivacyState,
    SiteData,
    run_evaluate,
    run_train,
    site_data_for,
    spend_record,
)
from fedllm.wire import (
    arrays_to_record,
    ciphertexts_to_record,
    is_encrypted,
    record_to_arrays,
    record_to_ciphertexts,
    route_fedllm_logs,
    sign_reply,
)

log = logging.getLogger("fedllm.client")
route_fedllm_logs()


def _site(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def _site_ledger(cfg: FedllmConfig, context: Context, site: int) -> Ledger:
    """This site's own privacy ledger (under `state-dir` from the node config, if given),
    sealed under the node config's `at-rest-key`, else the run's security.at-rest-key (a
    key that is named but unusable stops the site before it trains)."""
    root = context.node_config.get("state-dir")
    base = Path(str(root)) / cfg.run.name if root else Path(cfg.run.output_dir) / cfg.run.name
    key = configured_key(str(context.node_config.get("at-rest-key") or cfg.security.at_rest_key))
    return Ledger(base / "sites" / f"site-{site}" / "ledger.jsonl", key=key)


def _prepare(
    msg: Message, context: Context, overrides: dict[str, Any]
) -> tuple[FedllmConfig, SiteData, int]:
    cfg = parse_config({**context.run_config, **overrides})
    run_name = str(msg.content["config"].get("run-name", cfg.run.name))
    cfg.run.name = run_name
    site, num_sites = _site(context)
    data, tokenizer = site_data_for(cfg, site=site, num_sites=num_sites)
    return cfg, data, int(tokenizer.pad_token_id)


def _site_he(cfg: FedllmConfig, msg: Message, context: Context, site: int) -> SiteHE | None:
    """The site's HE state when the run aggregates under HE; a mismatch between what the
    run asks and what the coordinator sends is refused (never a silent plaintext round)."""
    config = msg.content["config"]
    asked = cfg.strategy.secure_aggregation == "he"
    if asked != ("he-key-id" in config):
        raise ProtectionUnavailableError(
            f"site {site}: the run config says strategy.secure-aggregation = "
            f"{cfg.strategy.secure_aggregation!r} but the coordinator "
            f"{'did not send' if asked else 'sent'} HE parameters; refusing the round."
        )
    if not asked:
        return None
    path = str(context.node_config.get("he-context", cfg.he.site_context))
    return SiteHE.load(cfg, path, site=site)


def _signing_key(cfg: FedllmConfig, context: Context, site: int) -> Ed25519PrivateKey | None:
    """The site's update-signing key under security.sign-updates (node config `signing-key`,
    else the run config's per-partition path); loaded before training, so a missing or
    world-readable key stops the site before it spends any privacy."""
    if not cfg.security.sign_updates:
        return None
    path = context.node_config.get("signing-key") or cfg.security.site_signing_key.format(
        partition=site
    )
    return load_signing_key(Path(str(path)))


def _reply(
    msg: Message, context: Context, content: RecordDict, key: Ed25519PrivateKey | None, phase: str
) -> Message:
    """The reply, signed last (run, round, this node, the payload's hash) when required."""
    if key is not None:
        server_round = int(msg.content["config"].get("server-round", 0))
        sign_reply(content, key, Claim(msg.metadata.run_id, server_round, context.node_id, phase))
    return Message(content=content, reply_to=msg)


def _global_arrays(msg: Message, he: SiteHE | None) -> dict[str, Any]:
    """The global adapter from the message: decrypted (and integrity-checked) under HE."""
    record = msg.content["arrays"]
    if he is None or not is_encrypted(record):
        return record_to_arrays(record)
    config = msg.content["config"]
    return he.open_global(
        record_to_ciphertexts(record),
        divisor=float(config["he-divisor"]),
        server_key=str(config["he-key-id"]),
    )


def create_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp; `overrides` (flat keys) are laid over the run config (for tests)."""
    client_app = ClientApp()
    extra = dict(overrides or {})

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, extra)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, extra)

    return client_app


def train(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Train one round; reply with the trainable adapter tensors and privacy spend."""
    cfg, data, pad_id = _prepare(msg, context, overrides)
    key = _signing_key(cfg, context, data.site)
    he = _site_he(cfg, msg, context, data.site)
    t0 = time.perf_counter()
    global_arrays = _global_arrays(msg, he)
    opened_seconds = time.perf_counter() - t0
    ledger = _site_ledger(cfg, context, data.site)
    state = PrivacyState.from_ledger(ledger.records())
    config = msg.content["config"]
    site_cap = context.node_config.get("epsilon-max")
    budget = effective_budget(
        epsilon_max=cfg.privacy.epsilon_max,
        target_epsilon=cfg.privacy.target_epsilon,
        site_epsilon_max=float(site_cap) if site_cap is not None else None,
    )
    try:
        out = run_train(
            cfg,
            data,
            global_arrays,
            state,
            pad_token_id=pad_id,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            budget=budget,
        )
    except BudgetExceededError as e:
        # A refusal is an answer, not a failure: the server leaves this site out and says why.
        log.warning("%s", e)
        refusal = MetricRecord({"site": data.site, "refused": 1, "num-examples": 0})
        reason = ConfigRecord({"reason": str(e)})
        content = RecordDict({"metrics": refusal, "refusal": reason})
        return _reply(msg, context, content, key, "train")
    if cfg.privacy.record_level:
        # The spend is durable at the site before the update leaves it.
        server_round = int(config.get("server-round", 0))
        ledger.append(spend_record(cfg, out, site=data.site, server_round=server_round))
    history = history_metrics(ledger.records()) if cfg.privacy.record_level else {}
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "site": data.site,
            "train-loss": out.result.mean_loss,
            "train-seconds": out.result.seconds,
            "steps": out.result.steps,
            "total-steps": out.total_steps,
            "epsilon": out.epsilon,
            "delta": out.delta,
            "noise-multiplier": out.noise_multiplier,
            "sample-rate": out.sample_rate,
            "max-grad-norm": cfg.privacy.max_grad_norm if cfg.privacy.record_level else 0.0,
            **{f"epsilon-{m}": float(out.epsilons.get(m, float("inf"))) for m in MECHANISMS},
            **history,  # lets the coordinator backfill spends whose replies it never accepted
        }
    )
    if cfg.safety.screen_site_data:  # a count only: the flagged examples stay at the site
        metrics["safety-dropped"] = data.safety_dropped
    log.info(
        "site %d: round trained, loss %.4f, epsilon %.4f",
        data.site,
        out.result.mean_loss,
        out.epsilon,
    )
    if he is not None:
        t0 = time.perf_counter()
        content = _sealed(cfg, msg, he, global_arrays, out, metrics)
        # What HE costs this site per round: decrypting the global, clipping/noising, sealing.
        metrics["he-seconds"] = opened_seconds + time.perf_counter() - t0
        return _reply(msg, context, content, key, "train")
    content = RecordDict({"arrays": arrays_to_record(out.arrays), "metrics": metrics})
    return _reply(msg, context, content, key, "train")


def _sealed(
    cfg: FedllmConfig,
    msg: Message,
    he: SiteHE,
    global_arrays: dict[str, Any],
    out: Any,
    metrics: MetricRecord,
) -> RecordDict:
    """The encrypted reply: the adapter weighted by examples / (the federation's examples),
    or under user-level DP the site's clipped update plus its 1/n share of the Gaussian
    noise, weighted 1/n (`share_weight`)."""
    num_sites = int(msg.content["config"]["he-sites"])
    if cfg.privacy.user_level:
        values, norm = noisy_clipped_contribution(
            global_arrays,
            out.arrays,
            clip_norm=cfg.privacy.user_clip,
            noise_multiplier=cfg.privacy.user_noise_multiplier,
            num_sites=num_sites,
            rng=secure_rng(),
        )
        log.info(
            "site %d: update norm %.4g clipped to %g, noise share added",
            he.site,
            norm,
            cfg.privacy.user_clip,
        )
    else:
        values = out.arrays
    weight = share_weight(
        user_level=cfg.privacy.user_level,
        num_examples=out.num_examples,
        unit=float(msg.content["config"].get("he-weight-unit", 1.0)),
        num_sites=num_sites,
    )
    blobs = he.seal(values, weight=weight, num_sites=num_sites)
    metrics["he-weight"] = weight
    return RecordDict(
        {
            "arrays": ciphertexts_to_record(blobs),
            "metrics": metrics,
            "he": ConfigRecord({"key-id": he.key, "sha256": payload_digest(blobs)}),
        }
    )


def evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Evaluate the global adapter on this site's held-out split."""
    cfg, data, pad_id = _prepare(msg, context, overrides)
    key = _signing_key(cfg, context, data.site)
    arrays = _global_arrays(msg, _site_he(cfg, msg, context, data.site))
    res = run_evaluate(cfg, data, arrays, pad_token_id=pad_id)
    metrics = MetricRecord(
        {
            "num-examples": res.num_examples,
            "site": data.site,
            "eval-loss": res.loss,
            "perplexity": res.perplexity,
            "eval-tokens": res.num_tokens,
            # The server derives the public weight unit of HE rounds from these.
            "train-examples": data.num_records,
        }
    )
    return _reply(msg, context, RecordDict({"metrics": metrics}), key, "evaluate")


app = create_app()
