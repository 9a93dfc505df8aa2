"""Held-out evaluation is a query on a site's private data for any adapter the coordinator
sends: the site's policy bounds how many it answers, counted at the site (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType

from fedllm import wire
from fedllm.config import parse_config
from fedllm.errors import ConfigError
from fedllm.mods.policy import PolicyMod
from fedllm.privacy.accounting import epsilon_report
from fedllm.site import PrivacyState, SiteData, SiteLimits, join_refusal
from fedllm.site_meter import METER_FILE, charge_evaluation, evaluation_counts
from fedllm.site_policy import SitePolicy, load_policy
from tests.test_mods import _config, _context, _message, _replying


def _policy(**caps: int) -> SitePolicy:
    return SitePolicy(source="p.toml", **caps)


def test_each_cap_refuses_once_reached_naming_the_key_and_the_count(tmp_path: Path) -> None:
    per_round = _policy(max_evaluations_per_round=2)
    assert charge_evaluation(tmp_path, per_round, run="r", server_round=1) == ""
    assert charge_evaluation(tmp_path, per_round, run="r", server_round=1) == ""
    reason = charge_evaluation(tmp_path, per_round, run="r", server_round=1)
    assert reason == (
        "site policy p.toml: max-evaluations-per-round = 2, and it has answered 2 in round 1 "
        "of run 'r'"
    )
    assert charge_evaluation(tmp_path, per_round, run="r", server_round=2) == ""  # a new round
    per_run = _policy(max_evaluations_per_run=3)
    assert "max-evaluations-per-run = 3, and it has answered 3 in run 'r'" in charge_evaluation(
        tmp_path, per_run, run="r", server_round=9
    )
    assert charge_evaluation(tmp_path, per_run, run="renamed", server_round=1) == ""
    total = _policy(max_evaluations=4)
    reason = charge_evaluation(tmp_path, total, run="renamed-again", server_round=1)
    assert "max-evaluations = 4, and it has answered 4 over every run" in reason


def test_a_refused_evaluation_is_not_counted_and_the_count_is_durable(tmp_path: Path) -> None:
    one = _policy(max_evaluations_per_run=1)
    charge_evaluation(tmp_path, one, run="r", server_round=0)
    before = (tmp_path / METER_FILE).read_text()
    assert charge_evaluation(tmp_path, one, run="r", server_round=1)
    assert (tmp_path / METER_FILE).read_text() == before
    assert evaluation_counts(tmp_path) == {
        "total": 1,
        "runs": {"r": {"total": 1, "rounds": {"0": 1}}},
    }


def test_without_caps_nothing_is_counted(tmp_path: Path) -> None:
    assert charge_evaluation(tmp_path, SitePolicy(), run="r", server_round=0) == ""
    assert not (tmp_path / METER_FILE).exists()


def test_caps_without_a_state_dir_stop_the_site_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="set the node config's 'state-dir'"):
        charge_evaluation(None, _policy(max_evaluations=1), run="r", server_round=0)


def test_a_corrupt_count_file_stops_the_site_and_is_never_reset(tmp_path: Path) -> None:
    (tmp_path / METER_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="is not fedllm's evaluation count"):
        charge_evaluation(tmp_path, _policy(max_evaluations=5), run="r", server_round=0)
    assert (tmp_path / METER_FILE).read_text() == "{not json"


def test_the_caps_are_whole_numbers_in_the_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("max-evaluations-per-round = 1.5\n")
    with pytest.raises(ConfigError, match="'max-evaluations-per-round' = 1.5 .*a whole number"):
        load_policy(path)
    path.write_text("max-evaluations-per-round = 1\nmax-evaluations = 10\n")
    policy = load_policy(path)
    assert (policy.max_evaluations_per_round, policy.max_evaluations) == (1, 10)


def test_the_policy_mod_counts_an_evaluation_before_the_app_answers_and_refuses_past_the_cap(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("max-evaluations-per-round = 1\n")
    state = tmp_path / "state"
    calls: list[Message] = []
    handler = _replying(lambda msg: RecordDict(), calls)
    context = _context({"run.name": "r"}, policy=str(policy), **{"state-dir": str(state)})
    mod = PolicyMod()
    first = mod(_message(_config(), MessageType.EVALUATE), context, handler)
    assert len(first.content.metric_records) == 0 and len(calls) == 1  # answered, not refused
    assert evaluation_counts(state)["total"] == 1
    second = mod(_message(_config(), MessageType.EVALUATE), context, handler)
    assert "max-evaluations-per-round = 1" in str(wire.refusal_reason(second.content))
    assert len(calls) == 1  # the handler never ran
    mod(_message(_config()), context, handler)  # training is not an evaluation
    assert len(calls) == 2 and evaluation_counts(state)["total"] == 1


# -- a run the site could not train in: it answers nothing for it ---------------------------


def _data(records: int = 64) -> SiteData:
    return SiteData(site=1, train=[{}] * records, eval=[], categories=[])


def _cfg(**flat: object) -> object:
    base = {"run.name": "second", "privacy.noise-multiplier": 1.0, "privacy.delta": 1e-5}
    return parse_config({**base, **flat})


def test_a_site_whose_lifetime_budget_is_spent_refuses_a_new_runs_first_request() -> None:
    cfg = _cfg()
    spent = [(1.0, 0.5, 2)] * 3  # what earlier runs on these records spent
    lifetime = float(epsilon_report(spent, delta=1e-5)["epsilon"])
    limits = SiteLimits(lifetime_budget=lifetime)
    reason = join_refusal(cfg, _data(), PrivacyState(), limits=limits, lifetime=spent)
    assert "over every run on its records (lifetime)" in reason and "refuses to train" in reason
    roomy = SiteLimits(lifetime_budget=lifetime + 100)
    assert join_refusal(cfg, _data(), PrivacyState(), limits=roomy, lifetime=spent) == ""


def test_a_site_already_training_in_the_run_goes_on_answering_its_evaluations() -> None:
    """Only a run's first request is refused this way; a site that reaches its cap mid-run
    refuses the next training round, and still reports on the adapters it helped train."""
    spent = [(1.0, 0.5, 2)]
    limits = SiteLimits(lifetime_budget=1e-3)
    state = PrivacyState(history=list(spent), delta=1e-5, noise_multiplier=1.0)
    assert join_refusal(_cfg(), _data(), state, limits=limits, lifetime=spent) == ""


def test_a_calibrated_sigma_below_the_policy_is_refused_at_the_first_request(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("min-noise-multiplier = 5.0\n")
    cfg = _cfg(**{"privacy.target-epsilon": 8.0})
    reason = join_refusal(cfg, _data(), PrivacyState(), limits=SiteLimits(load_policy(path)))
    assert "min-noise-multiplier = 5" in reason


def test_the_count_file_is_plain_json_an_operator_can_read(tmp_path: Path) -> None:
    charge_evaluation(tmp_path, _policy(max_evaluations=9), run="r", server_round=3)
    assert json.loads((tmp_path / METER_FILE).read_text())["runs"]["r"]["rounds"] == {"3": 1}
