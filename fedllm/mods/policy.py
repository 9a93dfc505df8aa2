"""The site's policy, as a client mod: a request it does not accept is refused before the
app reads any data (`fedllm.site_policy`), and so is one whose base model the site cannot
confirm is the run's (`fedllm.site_model`), one whose run name or config the site cannot
use, and an evaluation past the policy's caps (`fedllm.site_meter`)."""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedllm.config import FedllmConfig
from fedllm.errors import ConfigError
from fedllm.mods.context import SiteMod, local_model, partition
from fedllm.privacy.budget import effective_budget
from fedllm.site import SiteLimits
from fedllm.site_meter import charge_evaluation
from fedllm.site_model import model_refusal
from fedllm.site_policy import SitePolicy, load_policy
from fedllm.wire import CONFIG, SERVER_ROUND, refusal_content

__all__ = ["PolicyMod", "node_epsilon_max", "site_budget", "site_limits", "site_policy"]

log = logging.getLogger("fedllm.client")


def site_policy(context: Context) -> SitePolicy:
    """The policy the node config's `policy` names (a bad file stops the site), or the
    default, which accepts what fedllm can run."""
    path = context.node_config.get("policy")
    return load_policy(str(path)) if path else SitePolicy()


def node_epsilon_max(context: Context) -> float | None:
    """The node config's own `epsilon-max`, if set."""
    cap = context.node_config.get("epsilon-max")
    return float(cap) if cap is not None else None


def site_budget(cfg: FedllmConfig, context: Context, policy: SitePolicy) -> float | None:
    """The ε cap this site enforces: the run's, lowered by the site's own (policy, node)."""
    return effective_budget(
        epsilon_max=cfg.privacy.epsilon_max,
        target_epsilon=cfg.privacy.target_epsilon,
        site_epsilon_max=policy.cap(node_epsilon_max(context)),
    )


def site_limits(cfg: FedllmConfig, context: Context) -> SiteLimits:
    """The site's policy and its ε caps, in this run and over every run on its records."""
    policy = site_policy(context)
    return SiteLimits(
        policy=policy,
        budget=site_budget(cfg, context, policy),
        lifetime_budget=policy.cap(node_epsilon_max(context)),
    )


class PolicyMod(SiteMod):
    """Client mod that answers a request the site's policy does not accept, one whose base
    model is not the run's (`model.fingerprint`, the site's own copy in the node config's
    `model`), or one whose run name the site cannot use (a path, from a hostile
    coordinator), with a refusal naming the rule, before the handler (or any mod inside it)
    runs; an evaluation it answers is counted first, against the policy's caps. It sits
    inside `SignMod`, so the refusal is signed, and outside `HEMod`, so nothing is
    decrypted first."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Check the request; refuse it, or run the app."""
        policy = site_policy(ctxt)
        phase = "evaluate" if msg.metadata.message_type == MessageType.EVALUATE else "train"
        try:
            cfg = self.config(msg, ctxt)
        except ConfigError as e:  # the run name the coordinator sent, or its run config
            reason = f"the request cannot be used: {e}"
        else:
            reason = policy.refusal(cfg, phase, node_epsilon_max=node_epsilon_max(ctxt))
            if not reason:  # the policy's rules first: they hash nothing
                reason = model_refusal(cfg, local_model(ctxt))
            if not reason and phase == "evaluate":  # counted before it is answered
                reason = charge_evaluation(
                    ctxt.node_config.get("state-dir"),
                    policy,
                    run=cfg.run.name,
                    server_round=int(msg.content[CONFIG].get(SERVER_ROUND, 0)),
                )
        if not reason:
            return call_next(msg, ctxt)
        site = partition(ctxt)[0]
        log.warning("site %d refuses the %s request: %s", site, phase, reason)
        return Message(content=refusal_content(site, reason), reply_to=msg)
