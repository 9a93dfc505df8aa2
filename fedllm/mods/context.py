"""What the site's handlers and mods read from a message and its Context: the config the
site works under and the partition the node serves.

Each mod is built with the same `overrides` as the app (flat run-config keys laid over the
run config, for tests) and reads the config itself (`SiteMod`), so no value travels in
module globals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message

from fedllm.config import FedllmConfig, parse_config
from fedllm.site import LocalData, SiteData, site_data_for
from fedllm.wire import CONFIG, RUN_NAME

__all__ = ["SiteMod", "local_data", "local_model", "partition", "site_config", "site_inputs"]


def site_config(msg: Message, context: Context, overrides: Mapping[str, Any]) -> FedllmConfig:
    """The run config with `overrides` laid over it, under the run name the coordinator sends.

    Parameters
    ----------
    msg : Message
        The coordinator's message; its config record may name the run (`run-name`).
    context : Context
        The ClientApp's context; its `run_config` holds the flat run-config keys.
    overrides : Mapping[str, Any]
        Flat keys that replace the run config's (empty outside tests).

    Returns
    -------
    FedllmConfig
        A fresh config: callers may change it without touching another's.
    """
    flat = {**context.run_config, **overrides}
    if RUN_NAME in msg.content[CONFIG]:
        # Validated like any run.name: the site builds paths from it, so a name from the
        # coordinator with '/' or '..' stops the site (ConfigError) before anything is read.
        flat["run.name"] = msg.content[CONFIG][RUN_NAME]
    return parse_config(flat)


def partition(context: Context) -> tuple[int, int]:
    """This node's partition id (its site index) and the number of partitions."""
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def local_data(context: Context) -> LocalData | None:
    """The site's own data, if its node config names some (`data`, with `data-prompt-field`,
    `data-response-field` and `data-category-field` beside it)."""
    node = context.node_config
    if not node.get("data"):
        return None
    return LocalData(
        path=str(node["data"]),
        prompt_field=str(node.get("data-prompt-field", "prompt")),
        response_field=str(node.get("data-response-field", "response")),
        category_field=str(node.get("data-category-field", "")),
    )


def local_model(context: Context) -> str | None:
    """The site's own copy of the base model, if its node config names one (`model`: a
    directory saved with `save_pretrained`). The site then loads its model and tokenizer
    from it instead of `model.name`, and only under a run whose `model.fingerprint` is that
    copy's (`fedllm.site_model.model_refusal`, checked by `PolicyMod`)."""
    path = context.node_config.get("model")
    return str(path) if path else None


def site_inputs(cfg: FedllmConfig, context: Context) -> tuple[SiteData, Any, str | None]:
    """The site's data (its own, or its partition of the run's) and tokenizer, and its own
    copy of the base model if it has one (`local_model`)."""
    site, num_sites = partition(context)
    own = local_model(context)
    data, tokenizer = site_data_for(
        cfg, site=site, num_sites=num_sites, local=local_data(context), base_model=own
    )
    return data, tokenizer, own


class SiteMod:
    """Base of the site's client mods: a callable `mod(msg, ctxt, call_next)` (Flower's
    `Mod`, built like its `LocalDpMod`) that reads the site's config as the app does.

    Parameters
    ----------
    overrides : Mapping[str, Any] | None (default: None)
        Flat run-config keys laid over the run config, the same as the app's (for tests).
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self.overrides = dict(overrides or {})

    def config(self, msg: Message, ctxt: Context) -> FedllmConfig:
        """The config this message runs under (`site_config` with this mod's overrides)."""
        return site_config(msg, ctxt, self.overrides)

    def run_config(self, ctxt: Context) -> FedllmConfig:
        """The run config with this mod's overrides, without the run name a message sends:
        what a mod that handles keys reads, so a bad name is the policy's to refuse."""
        return parse_config({**ctxt.run_config, **self.overrides})
