"""A site's own policy decides what protects it, not the coordinator's run config (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedllm import wire
from fedllm.config import parse_config
from fedllm.errors import ConfigError, PolicyRefusedError
from fedllm.mods.policy import PolicyMod, site_budget
from fedllm.site_policy import SitePolicy, load_policy
from tests.coordinator import coordinator_run
from tests.replies import mock_reply
from tests.test_mods import _config, _context, _message, _replying

STRICT = """
privacy-modes = ["record"]
min-noise-multiplier = 0.8
max-delta = 1e-5
epsilon-max = 4.0
base-models = ["embedded:smollm2-135m-instruct"]
"""


@pytest.fixture()
def strict(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(STRICT)
    return path


def _request(**flat: object) -> object:
    return parse_config({"run.name": "r", "privacy.delta": 1e-6, **flat})


# -- the policy file ---------------------------------------------------------------------------


def test_a_policy_file_is_read_with_every_rule(strict: Path) -> None:
    policy = load_policy(strict)
    assert policy.privacy_modes == ("record",) and policy.min_noise_multiplier == 0.8
    assert policy.max_delta == 1e-5 and policy.epsilon_max == 4.0
    assert policy.base_models == ("embedded:smollm2-135m-instruct",)
    assert policy.answer_evaluate is True and policy.source == str(strict)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("epsilon-cap = 3.0\n", r"unknown key 'epsilon-cap'; known keys: privacy-modes"),
        ('min-noise-multiplier = "high"\n', r"'min-noise-multiplier' = 'high' has the wrong type"),
        ("answer-evaluate = 1\n", r"'answer-evaluate' = 1 has the wrong type; expected true"),
        ('privacy-modes = "record"\n', r"'privacy-modes' = 'record' .* a list of strings"),
        ('privacy-modes = ["record", "secure"]\n', r"privacy-modes names \['secure'\]"),
        ("epsilon-max = -1.0\n", r"'epsilon-max' = -1.0 must be >= 0"),
        ("max-delta = 1.5\n", r"max-delta must be below 1"),
        ("privacy-modes = [record\n", r"is not valid TOML"),
    ],
    ids=["unknown-key", "str-number", "int-bool", "str-list", "mode", "negative", "delta", "toml"],
)
def test_a_bad_policy_file_is_refused_in_one_line_naming_file_and_key(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named) as caught:
        load_policy(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"site policy .*absent.toml cannot be read"):
        load_policy(tmp_path / "absent.toml")


# -- the rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flat", "rule"),
    [
        ({"privacy.mode": "none"}, "privacy-modes = ['record'] does not include"),
        ({"privacy.mode": "user"}, "privacy-modes = ['record'] does not include"),
        ({"privacy.noise-multiplier": 0.5}, "min-noise-multiplier = 0.8"),
        ({"privacy.delta": 1e-3}, "max-delta = 1e-05"),
        ({"model.name": "HuggingFaceTB/SmolLM2-1.7B"}, "base-models"),
    ],
    ids=["no-dp", "user-level", "low-sigma", "high-delta", "other-model"],
)
def test_a_request_below_the_policy_is_refused_naming_the_rule(
    strict: Path, flat: dict[str, object], rule: str
) -> None:
    reason = load_policy(strict).refusal(_request(**flat), "train", node_epsilon_max=None)
    assert rule in reason and str(strict) in reason


@pytest.mark.parametrize("name", ["../../etc", "a/b", ".."])
def test_a_run_name_from_the_coordinator_that_is_not_a_plain_name_is_refused(name: str) -> None:
    """The site builds its paths from the run name the coordinator sends: one with '/' or
    '..' is answered with a refusal naming the rule (signed by SignMod outside), before the
    app (or any mod that reads files) runs."""
    calls: list[Message] = []
    msg = _message(_config(**{wire.RUN_NAME: name}))
    reply = PolicyMod()(msg, _context({}), _replying(lambda msg: RecordDict(), calls))
    assert calls == []
    assert re.search(
        r"'run.name' = .* must be a plain directory name", str(wire.refusal_reason(reply.content))
    )


def test_a_request_the_policy_accepts_is_not_refused(strict: Path) -> None:
    cfg = _request(**{"privacy.noise-multiplier": 0.8})
    assert load_policy(strict).refusal(cfg, "train", node_epsilon_max=None) == ""


def test_a_site_with_only_a_node_cap_refuses_a_run_without_dp() -> None:
    """The default policy accepts every mode, but a site that caps ε in its node config
    never trains without DP-SGD: no cap could hold the unbounded ε of such a round."""
    default = SitePolicy()
    no_dp = _request(**{"privacy.mode": "none"})
    reason = default.refusal(no_dp, "train", node_epsilon_max=2.0)
    assert "caps epsilon at 2" in reason and "privacy.mode = 'none'" in reason
    assert default.refusal(no_dp, "train", node_epsilon_max=None) == ""


def test_evaluation_is_refused_where_the_site_answers_none(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("answer-evaluate = false\n")
    reason = load_policy(path).refusal(_request(), "evaluate", node_epsilon_max=None)
    assert "answer-evaluate = false" in reason


@pytest.mark.parametrize(
    ("flat", "rule"),
    [
        ({"privacy.mode": "none"}, "privacy-modes"),
        ({"privacy.noise-multiplier": 0.5}, "min-noise-multiplier = 0.8"),
        ({"model.name": "gpt2"}, "base-models"),
    ],
)
def test_a_site_evaluates_nothing_for_a_run_whose_terms_it_refuses(
    strict: Path, flat: dict[str, object], rule: str
) -> None:
    """The run's terms hold for evaluation too: a site does not answer held-out losses for
    a run it would never train in."""
    reason = load_policy(strict).refusal(_request(**flat), "evaluate", node_epsilon_max=None)
    assert rule in reason


def test_a_calibrated_sigma_or_default_delta_below_the_policy_stops_training(strict: Path) -> None:
    policy = load_policy(strict)
    with pytest.raises(PolicyRefusedError, match="min-noise-multiplier = 0.8.*sigma 0.6"):
        policy.check_dp(0.6, 1e-6, site=2)
    with pytest.raises(PolicyRefusedError, match="max-delta = 1e-05.*delta 0.0001"):
        policy.check_dp(1.0, 1e-4, site=2)
    policy.check_dp(0.8, 1e-5, site=2)


def test_the_budget_is_the_lowest_of_the_runs_the_policys_and_the_nodes(strict: Path) -> None:
    cfg = _request(**{"privacy.epsilon-max": 10.0})
    context = Context(1, 7, {"epsilon-max": 3.0}, RecordDict(), {})
    assert site_budget(cfg, context, load_policy(strict)) == 3.0
    assert site_budget(cfg, Context(1, 7, {}, RecordDict(), {}), load_policy(strict)) == 4.0


# -- as the site applies it ----------------------------------------------------------------------


def test_the_policy_mod_refuses_before_the_app_reads_anything(strict: Path) -> None:
    """The handler (which would read the site's data) never runs; the reply is a refusal
    naming the rule."""
    calls: list[Message] = []
    handler = _replying(lambda msg: RecordDict(), calls)
    context = _context({"privacy.mode": "none", "run.name": "r"}, policy=str(strict))
    reply = PolicyMod()(_message(_config()), context, handler)
    assert calls == []
    assert wire.refusal_reason(reply.content) is not None
    assert "privacy-modes" in str(wire.refusal_reason(reply.content))


def test_the_policy_mod_passes_what_the_policy_accepts(strict: Path) -> None:
    calls: list[Message] = []
    handler = _replying(lambda msg: RecordDict(), calls)
    run_config = {"privacy.noise-multiplier": 1.0, "privacy.delta": 1e-6, "run.name": "r"}
    PolicyMod()(_message(_config()), _context(run_config, policy=str(strict)), handler)
    assert len(calls) == 1


def test_a_bad_policy_file_stops_the_site_before_the_app_runs(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text("sigma = 1\n")
    calls: list[Message] = []
    context = _context({}, policy=str(tmp_path / "policy.toml"))
    with pytest.raises(ConfigError, match="unknown key 'sigma'"):
        PolicyMod()(_message(_config()), context, _replying(lambda msg: RecordDict(), calls))
    assert calls == []


def test_the_coordinator_records_an_evaluation_refusal_as_a_refusal(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = coordinator_run(tiny_model_dir, tmp_path, **{"privacy.mode": "none"})
    refusal = wire.refusal_content(1, "site policy p.toml: answer-evaluate = false")
    assert run.strategy is not None
    run.strategy.aggregate_evaluate(0, [mock_reply(refusal, node_id=2, phase=MessageType.EVALUATE)])
    assert run.ctx.book.data["refused"] == [
        {"round": 0, "site": 1, "reason": "site policy p.toml: answer-evaluate = false"}
    ]
    assert not run.ctx.book.data.get("rejected")
