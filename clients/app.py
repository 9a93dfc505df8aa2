"""fedllm ClientApp: a site trains the LoRA adapter on its private data and sends only that.

Thin by design: it reads Flower records and context, calls `fedllm.site`, and packs the
reply. Each site's DP-SGD history persists in ``context.state`` and in a site-side file, so
the ε it reports is its cumulative spend over the whole run, resumed runs included.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.config import FedllmConfig, parse_config
from fedllm.records import arrays_to_record, record_to_arrays, route_fedllm_logs
from fedllm.site import PrivacyState, SiteData, run_evaluate, run_train, site_data_for

log = logging.getLogger("fedllm.client")
route_fedllm_logs()
_STATE_KEY = "fedllm.privacy"


def _site(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def _state_path(cfg: FedllmConfig, context: Context, site: int) -> Path:
    """Where this site keeps its own privacy record (`state-dir` in the node config)."""
    root = context.node_config.get("state-dir")
    base = Path(str(root)) if root else Path(cfg.run.output_dir) / cfg.run.name / "sites"
    return base / f"site-{site}" / "privacy-state.json"


def _prepare(
    msg: Message, context: Context, overrides: dict[str, Any]
) -> tuple[FedllmConfig, SiteData, int]:
    cfg = parse_config({**context.run_config, **overrides})
    run_name = str(msg.content["config"].get("run-name", cfg.run.name))
    cfg.run.name = run_name
    site, num_sites = _site(context)
    data, tokenizer = site_data_for(cfg, site=site, num_sites=num_sites)
    return cfg, data, int(tokenizer.pad_token_id)


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
    path = _state_path(cfg, context, data.site)
    if _STATE_KEY in context.state:
        state = PrivacyState.from_json(str(context.state[_STATE_KEY]["json"]))
    else:
        state = PrivacyState.load(path)
    config = msg.content["config"]
    out = run_train(
        cfg,
        data,
        record_to_arrays(msg.content["arrays"]),
        state,
        pad_token_id=pad_id,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    # Persist the spend before the update leaves the site.
    state.save(path)
    context.state[_STATE_KEY] = ConfigRecord({"json": state.to_json()})
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
        }
    )
    log.info(
        "site %d: round trained, loss %.4f, epsilon %.4f",
        data.site,
        out.result.mean_loss,
        out.epsilon,
    )
    content = RecordDict({"arrays": arrays_to_record(out.arrays), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context, overrides: dict[str, Any]) -> Message:
    """Evaluate the global adapter on this site's held-out split."""
    cfg, data, pad_id = _prepare(msg, context, overrides)
    res = run_evaluate(cfg, data, record_to_arrays(msg.content["arrays"]), pad_token_id=pad_id)
    metrics = MetricRecord(
        {
            "num-examples": res.num_examples,
            "site": data.site,
            "eval-loss": res.loss,
            "perplexity": res.perplexity,
            "eval-tokens": res.num_tokens,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


app = create_app()
