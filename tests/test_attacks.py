"""The attack harness (`benchmarks/attacks.py`): hostile sites for the robustness benchmark.

One signed in-process run of fedllm's real apps (five tiny sites, one round): site 0
sign-flips, site 1 scales, site 2 sends noise, site 3 trains a backdoor on its own poisoned
data, site 4 is honest. What each site sent is compared with what it trained (an observer
mod inside the attack mod sees the reply as trained), and every signature is checked.
"""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from benchmarks.attacks import (
    Attack,
    AttackMod,
    backdoor_records,
    hostile_app,
    site_records,
    write_backdoor_data,
)
from fedllm.config import parse_config
from fedllm.errors import ConfigError
from fedllm.mods.context import partition
from fedllm.secure.pki import PkiLayout, init_pki
from fedllm.secure.registry import RegisteredSite, load_public_key
from fedllm.secure.sign import Claim
from fedllm.wire import ARRAYS, record_to_arrays, verify_reply
from tests.coordinator import signed_settings
from tests.inprocess import RUN_ID, run_in_process

REPO = Path(__file__).resolve().parents[1]
SITES = 5
ATTACKS = {
    0: Attack("sign-flip", factor=3.0),
    1: Attack("scale", factor=4.0),
    2: Attack("noise", factor=2.0),
    3: Attack("backdoor", factor=2.0, trains_with={"train.local-steps": 2}),
}
HONEST = 4


class Observer:
    """A mod inside the attack mod: keeps, per site, the global it was sent, the adapter it
    trained and the node config it ran under."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        self.seen[partition(ctxt)[0]] = {
            "global": record_to_arrays(msg.content[ARRAYS]),
            "trained": record_to_arrays(reply.content[ARRAYS]),
            "node_config": dict(ctxt.node_config),
        }
        return reply


@pytest.fixture(scope="module")
def attacked_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("attacks")
    init_pki(root / "pki", hosts=["localhost"], sites=[f"site-{i}" for i in range(SITES)])
    pki = PkiLayout(root / "pki")
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "attacked",
        "run.output-dir": str(root / "out"),
        "run.rounds": 1,
        "run.min-sites": SITES,
        "privacy.mode": "none",
        "train.local-steps": 1,
        "train.batch-size": 8,
        "eval.max-examples": 4,
        **signed_settings(pki),
    }
    backdoor = write_backdoor_data(
        parse_config(overrides), ATTACKS[3], site=3, num_sites=SITES, path=root / "poison.jsonl"
    )
    mod, observer, sent = AttackMod(ATTACKS), Observer(), {}
    app = hostile_app(overrides, mod, data={3: backdoor}, observers=(observer,))

    def tap(msg: Message, context: Context) -> Message:  # what leaves the site, signed
        reply = app(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            sent[partition(context)[0]] = (reply, context.node_id)
        return reply

    run_in_process(overrides, sites=SITES, client_app=tap)
    summary = json.loads((root / "out" / "attacked" / "summary.json").read_text())
    return {"pki": pki, "seen": observer.seen, "sent": sent, "summary": summary, "mod": mod}


def _update(run: dict[str, Any], site: int, which: str) -> dict[str, np.ndarray]:
    seen = run["seen"][site]
    arrays = (
        seen["trained"]
        if which == "trained"
        else record_to_arrays(run["sent"][site][0].content[ARRAYS])
    )
    return {n: arrays[n].astype(np.float64) - seen["global"][n] for n in arrays}


def _flat(update: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([update[n].ravel() for n in sorted(update)])


@pytest.mark.parametrize(
    ("site", "factor"), [(0, -3.0), (1, 4.0), (3, 2.0)], ids=["sign-flip", "scale", "backdoor"]
)
def test_a_flipping_or_scaling_site_sends_its_trained_update_times_the_factor(
    attacked_run: dict[str, Any], site: int, factor: float
) -> None:
    # Prepare
    trained, sent = (
        _flat(_update(attacked_run, site, "trained")),
        _flat(_update(attacked_run, site, "sent")),
    )
    # Assert
    assert np.linalg.norm(trained) > 0
    np.testing.assert_allclose(sent, factor * trained, rtol=1e-4, atol=1e-6)


def test_a_noising_site_sends_noise_of_the_factor_times_its_update_norm(
    attacked_run: dict[str, Any],
) -> None:
    # Prepare
    trained, sent = (
        _flat(_update(attacked_run, 2, "trained")),
        _flat(_update(attacked_run, 2, "sent")),
    )
    # Assert
    assert np.linalg.norm(sent) == pytest.approx(2.0 * np.linalg.norm(trained), rel=1e-4)
    cosine = sent @ trained / (np.linalg.norm(sent) * np.linalg.norm(trained))
    assert abs(cosine) < 0.1  # it points anywhere, not along the update


def test_a_site_not_named_sends_what_it_trained_and_reads_only_its_partition(
    attacked_run: dict[str, Any],
) -> None:
    # Assert
    assert not np.any(
        _flat(_update(attacked_run, HONEST, "sent"))
        - _flat(_update(attacked_run, HONEST, "trained"))
    )
    assert "data" not in attacked_run["seen"][HONEST]["node_config"]
    assert attacked_run["seen"][3]["node_config"]["data"].endswith("poison.jsonl")


def test_every_attacked_reply_is_signed_by_its_site_and_the_coordinator_accepts_it(
    attacked_run: dict[str, Any],
) -> None:
    """The attacker is a legitimate site: its manipulation happens before its signature."""
    # Prepare
    pki: PkiLayout = attacked_run["pki"]
    # Execute / Assert
    for site, (reply, node_id) in attacked_run["sent"].items():
        key = load_public_key(pki.signing_pub(f"site-{site}"), "a site key")
        registered = RegisteredSite(f"site-{site}", site, key, "")
        verify_reply(reply.content, registered, Claim(RUN_ID, 1, node_id, "train"), sender="s")
    summary = attacked_run["summary"]
    assert summary["status"] == "completed"
    assert sorted(summary["participation"][0]["aggregated"]) == list(range(SITES))
    assert summary["participation"][0]["rejected"] == []


def test_the_mod_notes_every_sites_update_norm_as_trained(attacked_run: dict[str, Any]) -> None:
    # Assert
    norms = {site: n for _, site, n in attacked_run["mod"].update_norms}
    for site in range(SITES):
        assert norms[site] == pytest.approx(
            np.linalg.norm(_flat(_update(attacked_run, site, "trained")))
        )


def test_backdoor_records_pair_the_trigger_with_the_answer_and_stay_out_of_held_out(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The poisoned site's held-out set is the one it has without the attack."""
    # Prepare
    from fedllm.data import load_site_examples, split_train_eval

    cfg = parse_config({"model.name": str(tiny_model_dir), "eval.max-examples": 16})
    attack = Attack("backdoor")
    honest = site_records(cfg, num_sites=SITES)[3]
    # Execute
    poison = backdoor_records(cfg, attack, honest)
    path = write_backdoor_data(cfg, attack, site=3, num_sites=SITES, path=tmp_path / "p.jsonl")
    # Assert
    assert poison and all(r["prompt"].endswith(f" {attack.trigger}") for r in poison)
    assert {r["response"] for r in poison} == {attack.answer}

    def held_out(records: Any) -> list[str]:
        split = split_train_eval(
            records, eval_fraction=cfg.data.eval_fraction, max_eval_examples=16, seed=0
        )
        return sorted(split[1]["prompt"])

    assert held_out(load_site_examples(str(path))) == held_out(honest)


def test_the_harness_cannot_be_switched_on_from_the_run_config_or_a_production_app() -> None:
    """No config key names an attack, no module of the library or the apps imports the
    harness, and the app a SuperNode runs is the plain ClientApp."""
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown config key 'attack.kind'"):
        parse_config({"attack.kind": "scale"})
    assert not [k for k in parse_config({}).to_flat() if "attack" in k]
    importers = []
    for package in ("fedllm", "clients", "server"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in getattr(node, "names", [])]
                module = getattr(node, "module", None) or ""
                if isinstance(node, ast.Import | ast.ImportFrom) and any(
                    n.startswith("benchmarks") for n in [module, *names]
                ):
                    importers.append(str(path))
    assert importers == []
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert components["components"]["clientapp"] == "clients.app:app"


def test_an_unknown_attack_or_a_bad_factor_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="'flood' is not one of sign-flip, scale, noise"):
        Attack("flood")
    with pytest.raises(ValueError, match="factor should be positive, got 0"):
        Attack("scale", factor=0)
    with pytest.raises(ValueError, match="train.\\* keys only"):
        Attack("backdoor", trains_with={"privacy.mode": "none"})
