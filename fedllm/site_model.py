"""Whether a site's base model is the run's: the rule `PolicyMod` checks, with the site's
policy, before any data is read (pure: no Flower).

A site may run offline on its own copy of the base model (node config `model`, a
directory). It trains and evaluates only when it knows that copy is the model the run
names, which is what the run's `model.fingerprint` states (`fedllm.model_fingerprint`):

- the run sets `model.fingerprint` and the site's model has another fingerprint (its own
  copy, or the one `model.name` resolves to at this site): refused;
- the site has its own copy and the run sets no `model.fingerprint`: refused, with the
  copy's fingerprint, the value to set if the copy is the run's model;
- the run sets `model.fingerprint` and names a hub id this site has not cached: refused
  (nothing is downloaded just to check it);
- neither the run nor the site says anything: accepted, as before (no file is hashed).
"""

from __future__ import annotations

from fedllm.config import FedllmConfig
from fedllm.errors import ModelError
from fedllm.model_fingerprint import model_fingerprint, run_model_fingerprint

__all__ = ["model_refusal"]


def model_refusal(cfg: FedllmConfig, local_model: str | None) -> str:
    """Why this site refuses to train or evaluate under `cfg` with its base model (its own
    copy `local_model`, or else the one `model.name` names), or "" when it accepts.

    A model that cannot be fingerprinted (a missing directory, no weights) is a refusal
    naming it, not an error: the site cannot know what it would train.
    """
    want = cfg.model.fingerprint
    if local_model:
        where = f"node config 'model' = {local_model!r}"
        try:
            got = model_fingerprint(local_model)
        except ModelError as e:
            return f"base model: {where} cannot be fingerprinted: {e}"
        if not want:
            return (
                f"base model: {where} is this site's own copy, and the run sets no "
                f"model.fingerprint, so the site cannot know its copy is the run's "
                f"model.name = {cfg.model.name!r}; if it is, set model.fingerprint = "
                f'"{got}" in the run config'
            )
        if got != want:
            return (
                f"base model: model.fingerprint = {want!r}, but this site's own copy "
                f"({where}) has fingerprint {got!r}: not the run's base model"
            )
        return ""
    if not want:
        return ""
    name = f"model.name = {cfg.model.name!r}"
    try:
        got = run_model_fingerprint(cfg.model)
    except ModelError as e:
        return f"base model: model.fingerprint is set, but {name} cannot be fingerprinted: {e}"
    if got is None:
        return (
            f"base model: model.fingerprint is set, but {name} is not in this site's Hugging "
            "Face cache, so the site cannot check it; download it there first, or give the "
            "site its own copy (node config 'model')"
        )
    if got != want:
        return (
            f"base model: model.fingerprint = {want!r}, but {name} at this site has "
            f"fingerprint {got!r}: not the run's base model"
        )
    return ""
