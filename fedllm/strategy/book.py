"""`RunBook`: what each site did in each round, as the coordinator recorded it.

One record shared by the loop, the transport and the stages: per-site training and
evaluation figures of accepted replies, rejected replies, refusals, sites that did not
answer, bytes on the wire, and which Flower node each site answered from. It is plain data
in `state.json` (the keys below, unchanged since before the stages existed, so older run
directories resume), and `fedllm.summary` turns it into the run's core summary.

Under user-level DP without record-level DP (`privacy.mode = "user"`) the book keeps
participation to itself: which sites were sampled and answered each round is not protected
by the mechanism (one site added or removed changes it), so `withhold_participation()`
leaves the per-round training figures, the training-phase rejections and failures, the
refusals and the per-round bytes (an exact count of the messages) out of `state_dict()`,
and so out of `state.json` and `summary.json`. The in-memory record is unchanged: the
stages still read the round in progress.
"""

from __future__ import annotations

import copy
from logging import WARNING
from typing import Any

from flwr.app import Message
from flwr.common.logger import log

from fedllm.errors import UNREADABLE_REPLY
from fedllm.wire import reply_site

__all__ = ["RunBook"]

KEYS = ("evals", "trains", "failures", "rejected", "refused", "bytes", "node_sites")
# What names or counts the sites that trained in a round: kept out of state.json once
# participation is withheld (see the module docstring). `refused` has no phase (a training
# refusal and an evaluation refusal look alike), so all of it goes.
_PARTICIPATION = ("trains", "refused", "bytes")
_BY_PHASE = ("rejected", "failures")


class RunBook:
    """Per-round records, keyed as in `state.json`."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = {}
        self.participation_withheld = False
        self.load_state_dict(state or {})

    def withhold_participation(self) -> None:
        """Keep who trained in which round out of `state_dict()` (user-level DP; the
        user-level stage calls this)."""
        self.participation_withheld = True

    def state_dict(self) -> dict[str, Any]:
        if not self.participation_withheld:
            return copy.deepcopy(self.data)
        out = {k: copy.deepcopy(v) for k, v in self.data.items() if k not in _PARTICIPATION}
        for k in _BY_PHASE:
            if k in out:
                out[k] = [e for e in out[k] if e.get("phase", "train") != "train"]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = {k: copy.deepcopy(state[k]) for k in KEYS if k in state}

    # -- writing ----------------------------------------------------------------------------
    def record(self, kind: str, server_round: int, site: int, metrics: dict[str, Any]) -> None:
        """An accepted reply's figures: `kind` is "trains" or "evals"."""
        self.data.setdefault(kind, {}).setdefault(str(server_round), {})[str(site)] = metrics

    def reject(self, server_round: int, reply: Message, phase: str, error: Exception) -> None:
        """A reply refused by a check, named by the site it claims to be (even when its
        signature failed) and its node."""
        log(
            WARNING,
            "fedllm: rejected %s reply: %s%s",
            phase,
            error,
            " (operator's log only: not in the run's files under user-level DP)"
            if self.participation_withheld and phase == "train"
            else "",
        )
        try:
            site: int | None = reply_site(reply.content)
        except UNREADABLE_REPLY:
            site = None
        node = reply.metadata.src_node_id
        self.data.setdefault("rejected", []).append(
            {
                "round": server_round,
                "phase": phase,
                "site": site,
                "sender": f"site {site} (node {node})" if site is not None else f"node {node}",
                "reason": str(error),
            }
        )

    def refuse(self, server_round: int, site: int, reason: str) -> None:
        """A site that declined the round (its privacy budget): an answer, not a failure."""
        self.data.setdefault("refused", []).append(
            {"round": server_round, "site": site, "reason": reason}
        )

    def fail(self, server_round: int, phase: str, node: int, reason: str) -> None:
        self.data.setdefault("failures", []).append(
            {
                "round": server_round,
                "phase": phase,
                "node": node,
                "site": self.site_of(node),
                "reason": reason,
            }
        )

    def add_bytes(self, server_round: int, *, up: int, down: int) -> None:
        entries = self.data.setdefault("bytes", [])
        entry = next((e for e in entries if e["round"] == server_round), None)
        if entry is None:
            entry = {"round": server_round, "up": 0, "down": 0}
            entries.append(entry)
        entry["up"] += up
        entry["down"] += down

    def seen(self, node: int, site: int) -> None:
        """Remember the node a site answers from, so a site that drops out is named."""
        self.data.setdefault("node_sites", {})[str(node)] = site

    # -- reading ----------------------------------------------------------------------------
    def site_of(self, node: int) -> int | None:
        return self.data.get("node_sites", {}).get(str(node))

    def round(self, kind: str, server_round: int) -> dict[str, dict[str, Any]]:
        """Per-site figures of one round ("trains" or "evals")."""
        return self.data.get(kind, {}).get(str(server_round), {})

    def count(self, kind: str, server_round: int) -> int:
        """How many training-phase entries of `kind` (refused, rejected, failures) a round has."""
        return sum(
            1
            for r in self.data.get(kind, [])
            if r["round"] == server_round and r.get("phase", "train") == "train"
        )

    def own_count(self, site: int) -> int | None:
        """The training examples a site reported when it evaluated the initial adapter
        (round 0), fixed before any round, so no later reply can change it; for a site
        outside the evaluation cohort (`eval.sites`), the weight of its first accepted
        update, so no later reply can raise it."""
        count = self.round("evals", 0).get(str(site), {}).get("train-examples")
        if count is None:
            trained = self.data.get("trains", {})
            first = min((int(r) for r, done in trained.items() if str(site) in done), default=None)
            if first is not None:
                count = trained[str(first)][str(site)].get("num-examples")
        return count if isinstance(count, int) and count > 0 else None

    def fixed_train_examples(self) -> float:
        """The federation's training examples as the sites reported them before round 1
        (0 if none did)."""
        return float(sum(c for s in self.round("evals", 0) if (c := self.own_count(int(s)))))
