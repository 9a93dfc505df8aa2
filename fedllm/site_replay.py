"""A site's last training reply, kept so that a round asked again is answered, not retrained.

A coordinator that dies mid-round resumes after its last durable round and asks the sites
for that round again, with the same global adapter. Training again would spend the site's
privacy twice for one round and put the round in its ledgers twice; so the site keeps its
last reply (the update, its metrics and its unsigned spend record, beside its run ledger,
sealed like it under the site's at-rest key) and answers the same request (run, round,
config, data, global adapter: `request_digest`) with the same update. A replayed update
reveals nothing new, whatever the coordinator does with it. Any other request, including
the same round with another global adapter, is trained (and spent) afresh.

The reply is written before its spend: a site killed between the two finds the reply, sees
the spend missing from its run ledger and appends it before the update leaves, so the
spend is recorded exactly once in either order of failure.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm import wire as w
from fedllm.privacy.ledger import Ledger
from fedllm.secure.at_rest import AtRestError, AtRestKey, read_file, stored_file, write_file
from fedllm.site import spend_record

__all__ = ["REPLY_FILE", "ReplyStore", "StoredReply", "fresh_reply", "request_digest"]

log = logging.getLogger("fedllm.client")  # the ClientApp's logger (`clients/app.py`)
REPLY_FILE = "last-reply.npz"
_META = "__fedllm_reply__"  # the JSON part (digest, metrics, spend), stored as uint8 bytes


def request_digest(
    *, config_sha256: str, data_fingerprint: str, server_round: int, proximal_mu: float,
    arrays: dict[str, np.ndarray],
) -> str:  # fmt: skip
    """SHA-256 of everything a round's training depends on that the request decides."""
    h = hashlib.sha256()
    head = {"config": config_sha256, "data": data_fingerprint, "round": int(server_round)}
    h.update(json.dumps({**head, "mu": float(proximal_mu)}, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class StoredReply:
    """A training reply as the handler made it: the update, its metrics (without the ledger
    history, which is read when the reply leaves) and its spend record (None without
    record-level DP)."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    spend: dict[str, Any] | None


def fresh_reply(cfg: Any, data: Any, out: Any, server_round: int) -> StoredReply:
    """A freshly trained round (`out`, a `fedllm.site.SiteRound`, on `data`, the site's
    `SiteData`) as the site keeps it: update, metrics, unsigned spend."""
    record_level = cfg.privacy.record_level
    max_grad_norm = cfg.privacy.max_grad_norm if record_level else 0.0
    metrics = w.train_metrics(out, site=data.site, max_grad_norm=max_grad_norm, history={})
    if cfg.safety.screen_site_data:  # a count only: the flagged examples stay at the site
        metrics[w.SAFETY_DROPPED] = data.safety_dropped
    spend = None  # no record-level DP: nothing was spent
    if record_level:
        spend = spend_record(cfg, out, site=data.site, server_round=server_round)
    log.info(
        "site %d: round trained, loss %.4f, epsilon %.4f",
        data.site, out.result.mean_loss, out.epsilon,
    )  # fmt: skip
    return StoredReply(arrays=out.arrays, metrics=metrics, spend=spend)


@dataclass(frozen=True)
class ReplyStore:
    """The one stored reply of a site in a run, beside (and sealed like) its run ledger."""

    path: Path
    key: AtRestKey | None

    @classmethod
    def beside(cls, ledger: Ledger) -> ReplyStore:
        return cls(path=ledger.path.parent / REPLY_FILE, key=ledger.key)

    def _label(self) -> str:
        return f"site reply {self.path.parent.name}/{REPLY_FILE}"

    def save(self, digest: str, reply: StoredReply) -> None:
        """Replace the stored reply, atomically (a crash leaves the old one or the new)."""
        meta = {"digest": digest, "metrics": reply.metrics, "spend": reply.spend}
        buffer = io.BytesIO()
        # ε is infinite without record-level DP, hence JSON's Infinity (this file only)
        text = json.dumps(meta, default=_plain)
        blob = np.frombuffer(text.encode(), dtype=np.uint8)
        np.savez(buffer, **reply.arrays, **{_META: blob})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        written = write_file(tmp, buffer.getvalue(), self.key, label=self._label())
        with open(written, "rb+") as f:
            os.fsync(f.fileno())
        written.replace(self.path.with_name(self.path.name + written.name[len(tmp.name) :]))

    def load(self, digest: str) -> StoredReply | None:
        """The stored reply to this very request, or None (none stored, another request, or
        a file that does not open or parse: then the round is simply trained again)."""
        if stored_file(self.path) is None:
            return None
        try:
            raw = read_file(self.path, self.key, label=self._label())
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                meta = json.loads(npz[_META].tobytes().decode())
                if meta.get("digest") != digest:
                    return None
                arrays = {n: npz[n] for n in npz.files if n != _META}
        except (AtRestError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return StoredReply(arrays=arrays, metrics=dict(meta["metrics"]), spend=meta["spend"])
