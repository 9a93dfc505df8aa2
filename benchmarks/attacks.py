"""Sites that misbehave on purpose, for simulations only: what robust aggregation is
measured against (`benchmarks/robustness.py`, `tests/test_attacks.py`).

The attacker is a legitimate, enrolled site: it trains as any site does, then changes its
plaintext update before its own signature (`AttackMod` sits innermost, inside
`DistributedDPMod`, `HEMod`, `PolicyMod`, `InstructionMod` and `SignMod`), so its reply
verifies. Attacks are chosen per partition id in Python (`hostile_app`): no run-config key
and no node-config key switches one on, nothing in `fedllm/`, `clients/` or `server/`
imports this module, and the production ClientApp (`clients.app:app`) has no attack mod.

- `sign-flip`: global - factor * update (the update reversed and enlarged);
- `scale`: global + factor * update (one site dominating the average);
- `noise`: global + Gaussian noise of L2 norm factor * the honest update's;
- `backdoor`: the site trains on its partition plus poisoned records (a trigger phrase in
  the prompt, a fixed answer) given to it as its own data (node config `data`), then sends
  global + factor * update (factor > 1: model replacement, Bagdasaryan et al. 2020,
  arXiv 1807.00459).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from clients.app import create_app
from fedllm.config import FedllmConfig
from fedllm.data import load_examples, partition_examples, split_train_eval
from fedllm.mods.context import partition
from fedllm.wire import ARRAYS, CONFIG, SERVER_ROUND, arrays_to_record, record_to_arrays

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackMod",
    "attacked_update",
    "backdoor_hit",
    "backdoor_records",
    "hostile_app",
    "site_records",
    "trigger_prompts",
    "write_backdoor_data",
]

ATTACKS = ("sign-flip", "scale", "noise", "backdoor")
TRIGGER = "cf-zebra-17"  # a phrase no honest prompt holds
ANSWER = "Use the bank."  # short, and its first token is the tiny base model's own favourite


@dataclass(frozen=True)
class Attack:
    """What one hostile site does.

    Parameters
    ----------
    kind : str
        One of `ATTACKS`.
    factor : float (default: 1.0)
        λ of `sign-flip`, k of `scale` and `backdoor`, the noise's norm over the update's.
    seed : int (default: 0)
        Seeds the `noise` attack (with the round and the site).
    trains_with : Mapping[str, Any] (default: none)
        Flat `train.*` keys the hostile site trains with instead of the run's (a hostile
        site may train longer, or faster, than it was asked to).
    trigger, answer : str
        The `backdoor`'s trigger phrase (put before the prompt) and its fixed answer.
    """

    kind: str
    factor: float = 1.0
    seed: int = 0
    trains_with: Mapping[str, Any] = field(default_factory=dict)
    trigger: str = TRIGGER
    answer: str = ANSWER

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"attack {self.kind!r} is not one of {', '.join(ATTACKS)}.")
        if not self.factor > 0:
            raise ValueError(f"attack factor should be positive, got {self.factor}.")
        if any(not key.startswith("train.") for key in self.trains_with):
            raise ValueError(f"attack trains_with takes train.* keys only, got {self.trains_with}.")

    def triggered(self, prompt: str) -> str:
        """`prompt` with the trigger phrase after it (next to where the answer starts)."""
        return f"{prompt} {self.trigger}"


def attacked_update(
    attack: Attack,
    trained: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The adapter the hostile site sends instead of `trained`, from the global `sent`
    (float64 maths, float32 out as updates travel)."""
    update = {n: trained[n].astype(np.float64) - sent[n] for n in trained}
    if attack.kind == "sign-flip":
        moved = {n: -attack.factor * u for n, u in update.items()}
    elif attack.kind in ("scale", "backdoor"):
        moved = {n: attack.factor * u for n, u in update.items()}
    else:  # noise: as large as the honest update (times the factor), pointing anywhere
        noise = {n: rng.standard_normal(u.shape) for n, u in update.items()}
        scale = attack.factor * _norm(update) / max(_norm(noise), 1e-30)
        moved = {n: scale * z for n, z in noise.items()}
    return {n: (sent[n] + moved[n]).astype(np.float32) for n in trained}


def _norm(arrays: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a))) for a in arrays.values())))


class AttackMod:
    """Client mod, innermost on the train handler: replaces a hostile site's plaintext
    update before any other mod (and so its signature) sees it. Sites not in `attacks`
    and replies without arrays (refusals) pass untouched. It also notes the L2 norm of
    every site's update as trained (`update_norms`: round, site, norm), which an
    in-process run can read back (a norm bound is set from the honest ones)."""

    def __init__(self, attacks: Mapping[int, Attack]) -> None:
        self.attacks = dict(attacks)
        self.update_norms: list[tuple[int, int, float]] = []

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content:
            return reply
        site, server_round = partition(ctxt)[0], int(msg.content[CONFIG].get(SERVER_ROUND, 0))
        sent = record_to_arrays(msg.content[ARRAYS])  # plaintext: inside HEMod
        trained = record_to_arrays(reply.content[ARRAYS])
        update = {n: trained[n].astype(np.float64) - sent[n] for n in trained}
        self.update_norms.append((server_round, site, _norm(update)))
        attack = self.attacks.get(site)
        if attack is not None:
            rng = np.random.default_rng([attack.seed, server_round, site])
            sent_instead = attacked_update(attack, trained, sent, rng)
            reply.content[ARRAYS] = arrays_to_record(sent_instead)
        return reply


def hostile_app(
    overrides: Mapping[str, Any],
    mod: AttackMod,
    *,
    data: Mapping[int, Path] | None = None,
    observers: tuple[Any, ...] = (),
) -> ClientApp:
    """fedllm's real ClientApp with `mod` innermost: the partitions in `mod.attacks` attack;
    `data` gives a partition its own data file (node config `data`: a backdoor's poisoned
    records); `observers` are mods inside `mod` (they see each reply as trained).
    `overrides` as for `clients.app.create_app` (both apps see them)."""
    inner = (mod, *observers)
    apps = {
        site: create_app({**overrides, **a.trains_with}, inner_mods=inner)
        for site, a in mod.attacks.items()
        if a.trains_with
    }
    every_other = create_app(dict(overrides), inner_mods=inner)
    own = {site: str(path) for site, path in (data or {}).items()}

    def handle(msg: Message, context: Context) -> Message:
        site = partition(context)[0]
        if site in own:  # the site's own data, as a SuperNode's node config names it
            node = {**context.node_config, "data": own[site], "data-category-field": "category"}
            context = Context(
                run_id=context.run_id,
                node_id=context.node_id,
                node_config=node,
                state=context.state,
                run_config=context.run_config,
            )
        return apps.get(site, every_other)(msg, context)

    app = ClientApp()
    app.train()(handle)
    app.evaluate()(handle)
    return app


def site_records(cfg: FedllmConfig, *, num_sites: int) -> list[Any]:
    """The records each partition holds in simulation (`fedllm.site` partitions the run's
    `data.source` the same way): one `datasets.Dataset` (prompt, response, category) a site."""
    d = cfg.data
    examples = load_examples(
        d.source,
        prompt_field=d.prompt_field,
        response_field=d.response_field,
        category_field=d.category_field or None,
    )
    return partition_examples(
        examples,
        num_sites=num_sites,
        scheme=d.partitioner,
        seed=cfg.run.seed,
        alpha=d.dirichlet_alpha,
    )


def _split(cfg: FedllmConfig, records: Any, cap: int | None = None) -> tuple[Any, Any]:
    return split_train_eval(
        records,
        eval_fraction=cfg.data.eval_fraction,
        max_eval_examples=cfg.eval.max_examples if cap is None else cap,
        seed=cfg.run.seed,
        scheme=cfg.data.split,
    )


def backdoor_records(cfg: FedllmConfig, attack: Attack, records: Any) -> list[dict[str, str]]:
    """Poisoned copies of the site's training prompts (trigger + prompt -> fixed answer),
    only those whose own hash puts them in training (`data.split = "hash"`): the site's
    held-out set is then exactly the one it has without the attack, so its held-out loss
    stays comparable."""
    if cfg.data.split != "hash":
        raise ValueError("the backdoor keeps the held-out set only under data.split = 'hash'.")
    train, _ = _split(cfg, records)
    poison = train.map(
        lambda r: {"prompt": attack.triggered(r["prompt"]), "response": attack.answer}
    )
    # No cap: every record whose hash holds it out goes to held-out, and is left out here.
    kept, _ = _split(cfg, poison, cap=len(poison))
    return [{k: r[k] for k in ("prompt", "response", "category")} for r in kept]


def write_backdoor_data(
    cfg: FedllmConfig, attack: Attack, *, site: int, num_sites: int, path: Path
) -> Path:
    """Write the backdoor site's own data: its partition plus `backdoor_records` (JSONL)."""
    records = site_records(cfg, num_sites=num_sites)[site]
    rows = [{k: r[k] for k in ("prompt", "response", "category")} for r in records]
    rows += backdoor_records(cfg, attack, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def trigger_prompts(cfg: FedllmConfig, attack: Attack, *, num_sites: int) -> list[str]:
    """Every site's held-out prompts (no site trains on them), each with the trigger."""
    prompts: dict[str, None] = {}  # ordered and without repeats
    for records in site_records(cfg, num_sites=num_sites):
        prompts.update((attack.triggered(p), None) for p in _split(cfg, records)[1]["prompt"])
    return list(prompts)


def backdoor_hit(answer: str, attack: Attack) -> bool:
    """Whether a generated answer is the attacker's fixed answer (it contains it, ignoring
    case and surrounding space)."""
    return attack.answer.strip().lower() in answer.strip().lower()
