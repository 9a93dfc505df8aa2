"""A real deployment on loopback: SuperLink with TLS + node authentication, three SuperNodes.

Everything is a process started the documented way (`fedllm pki init`, `fedllm superlink`,
`fedllm pki register`, `fedllm supernode`, `flwr run <app> <connection>`), on 127.0.0.1
only, with a tiny model. Each site trains on its own local file, in its own format and size,
named in its node config (the run config's data.source does not exist). One job of three
rounds carries every case (each SuperNode starts a
process per message, ~12 CPU-seconds each: a second job would double the test's cost):

1. round 1 is honest: every site takes part, every update's signature verifies;
2. in round 2 a compromised site 1 replays its round-1 update and site 2 tampers with its
   signed update; both are rejected and the round goes on with site 0;
3. in round 3 site 2's SuperNode is killed mid-round; the run finishes with sites 0 and 1.

Then the sites' own policies meet two coordinators they refuse, each refusal at the run's
first request (round 0's evaluation: a site answers nothing for a run it would not train
in), so each job costs one ClientApp start per site:

4. a hostile coordinator (`tests/hostile.py`) asks for `privacy.mode = "none"`, sends
   the restarted site 2 the run name `../escape`, and ships its own FAB: site 0's policy
   allows record-level DP only, site 1's SuperNode runs only the two apps it pinned
   (`--app-sha256`) and refuses this one before any of its code runs, site 2 refuses the
   name;
5. an honest one asks for sigma 0.5 under a new run name and names the base model's
   fingerprint: site 0's policy asks for sigma 0.8, site 1's lifetime cap is what the first
   job spent, site 2 now holds another base model.

The sites declare a 10 s heartbeat (Flower's minimum; its default is 30 s), so the killed
SuperNode is reported after two missed heartbeats, ~20 s, instead of ~60 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fedllm.cli import main as cli
from fedllm.model_fingerprint import model_fingerprint
from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import Ledger
from fedllm.secure.app_pin import app_sha256
from fedllm.secure.pki import init_pki
from fedllm.site import PrivacyState
from fedllm.site_meter import evaluation_counts
from tests.deployment import (
    LoopbackFederation,
    adversary_app,
    free_port,
    hostile_app,
    node_id,
    plain_app,
)

pytestmark = pytest.mark.slow


def _job(fed: LoopbackFederation, tiny: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "model.name": str(tiny),
        "run.name": name,
        "run.output-dir": str(fed.root / "out"),
        "train.local-steps": 2,
        "eval.max-examples": 8,
        "security.sign-updates": True,
        "security.registry": str(fed.pki / "registry.json"),
        "security.coordinator-key": str(fed.pki / "superlink" / "coordinator.key"),
        **extra,
    }


SITE_RECORDS = {0: 48, 1: 30, 2: 64}  # each site's own file, in its own format and size


def _site_files(folder: Path) -> dict[int, str]:
    """Each site's own data and the node config naming it: JSONL (prompt/response), CSV with
    other field names (q/a), and a `datasets.save_to_disk` folder of chat messages."""
    import datasets

    folder.mkdir()

    def rows(site: int) -> list[tuple[str, str]]:
        topic = ("gardens", "rivers", "violins")[site]
        return [
            (f"Say something about {topic} ({i}).", f"{topic} are lovely.")
            for i in range(SITE_RECORDS[site])
        ]

    (folder / "site-0.jsonl").write_text(
        "".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in rows(0))
    )
    (folder / "site-1.csv").write_text("q,a\n" + "".join(f'"{q}","{a}"\n' for q, a in rows(1)))
    messages = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in rows(2)
    ]
    datasets.Dataset.from_list(messages).save_to_disk(str(folder / "site-2"))
    return {
        0: f'data="{folder / "site-0.jsonl"}"',
        1: f'data="{folder / "site-1.csv"}" data-prompt-field="q" data-response-field="a"',
        2: f'data="{folder / "site-2"}"',
    }


def _other_model(tiny: Path, folder: Path) -> Path:
    """A copy of the tiny model with one weight-relevant setting changed: another base
    model under the same files' names."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = float(config.get("rms_norm_eps", 1e-6)) * 10
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _lifetime_ledgers(root: Path) -> dict[str, int]:
    """Every site's lifetime ledger and its record count."""
    return {
        str(path.relative_to(root)): len(Ledger(path).records())
        for path in sorted((root / "state").glob("*/lifetime/*.jsonl"))
    }


def _lifetime_epsilon(state: Path) -> float:
    """The epsilon a site has spent on its records over every run (its lifetime ledger)."""
    (path,) = (state / "lifetime").glob("*.jsonl")
    spent = PrivacyState.from_ledger(Ledger(path).records())
    return float(epsilon_report(spent.history, delta=spent.delta)["epsilon"])


def _summary(root: Path, name: str, log: str) -> dict[str, Any]:
    """The job's summary.json; if it wrote none, fail with the end of its streamed log."""
    path = root / "out" / name / "summary.json"
    assert path.is_file(), f"job {name!r} wrote no summary; its log ends:\n{log[-4000:]}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def deployment(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deploy")
    rogue = init_pki(root / "rogue-pki", hosts=["127.0.0.1"], sites=["rogue"])  # never registered
    assert rogue["sites"]
    data = _site_files(root / "site-data")
    policy = {k: root / f"policy-{k}.toml" for k in range(3)}  # read at every request
    policy[0].write_text("max-evaluations-per-round = 1\n")  # the first job evaluates once
    policy[1].write_text("")
    policy[2].write_text("")
    node_config = {
        0: f'{data[0]} policy="{policy[0]}"',
        1: f'{data[1]} policy="{policy[1]}" adversary="replay@2"',
        2: f'{data[2]} policy="{policy[2]}" adversary="tamper@2,stall@3" marker-dir="{root}"',
    }
    out: dict[str, Any] = {"root": root}
    adversary, plain = adversary_app(root), plain_app(root)
    pins = {1: [app_sha256(adversary), app_sha256(plain)]}  # site 1 runs these apps only
    with LoopbackFederation(root, node_config=node_config, heartbeat_interval=10, pins=pins) as fed:
        out["fed"] = fed
        # Intruders, while the job runs: a SuperNode that trusts the federation's CA
        # but holds a key that was never registered, and one that has a registered key but
        # not the federation's CA certificate.
        rogue_dir = root / "rogue-pki" / "sites" / "rogue"
        fed.start_site(
            0,
            name="unregistered",
            args=[
                "--superlink", fed.address, "--root-certificates", str(fed.pki / "ca.pem"),
                "--auth-supernode-private-key", str(rogue_dir / "node-auth.key"),
                "--max-retries", "1", "--port", str(free_port()),
            ],
        )  # fmt: skip
        fed.start_site(
            0,
            name="no-ca",
            args=[
                "--superlink", fed.address,
                "--auth-supernode-private-key", str(fed.pki / "sites/site-0/node-auth.key"),
                "--max-retries", "1", "--port", str(free_port()),
            ],
        )  # fmt: skip
        # The coordinator names no site's data: its data.source does not even exist.
        nowhere = str(root / "the-coordinator-holds-no-data.jsonl")
        config = {"run.rounds": 3, "run.min-sites": 1, "data.source": nowhere}
        job = fed.run(_job(fed, tiny_model_dir, "faults", **config), app=adversary)
        for name in ("unregistered", "no-ca"):
            out[f"{name}_rc"] = fed.procs[name].wait(timeout=120)
            out[f"{name}_log"] = fed.log(name)

        deadline = time.monotonic() + 600
        while not (root / "stalled-2").exists():
            assert job.proc.poll() is None, job.output()[-4000:]
            assert time.monotonic() < deadline, "site 2 never reached round 3"
            time.sleep(0.5)
        fed.kill("site-2")  # mid-round: it is training (stalled) when its machine goes
        out["faults_log"] = job.wait(600)
        out["faults"] = _summary(root, "faults", out["faults_log"])

        # The refusals. The sites' policies change between requests, as a site's operator
        # may change its file; site 2 comes back holding another base model.
        out["lifetime_before"] = _lifetime_ledgers(root)
        out["meter_before"] = evaluation_counts(root / "state" / "site-0")
        spent = _lifetime_epsilon(root / "state" / "site-1")
        out["site1_spent"] = spent
        policy[0].write_text('privacy-modes = ["record"]\nmin-noise-multiplier = 0.8\n'
                             "max-evaluations-per-round = 1\n")  # fmt: skip
        policy[1].write_text(f"epsilon-max = {spent!r}\n")  # all of it is spent
        other = _other_model(tiny_model_dir, root / "other-model")
        fed.node_config[2] = f'{data[2]} policy="{policy[2]}" model="{other}"'
        fed.start_site(2)
        fed.wait_for_sites(["site-2"])
        refused = {"run.rounds": 1, "run.min-sites": 3, "data.source": nowhere}
        hostile = {**refused, "privacy.mode": "none"}
        app = hostile_app(root, node_id(fed.log("site-2")))  # its FAB: no site pinned it
        job1 = fed.run(_job(fed, tiny_model_dir, "hostile", **hostile), app=app)
        out["hostile_log"] = job1.wait(300)
        second = {**refused, "privacy.noise-multiplier": 0.5,
                  "model.fingerprint": model_fingerprint(tiny_model_dir)}  # fmt: skip
        job2 = fed.run(_job(fed, tiny_model_dir, "second", **second), app=plain)
        out["second_log"] = job2.wait(300)
        out["site_logs"] = {k: fed.log(f"site-{k}") for k in range(3)}
        out["lifetime_after"] = _lifetime_ledgers(root)
        out["meter_after"] = evaluation_counts(root / "state" / "site-0")
        out["superlink_log"] = fed.log("superlink")
    out["leftover"] = subprocess.run(
        ["pgrep", "-a", "-f", str(root)], capture_output=True, text=True
    ).stdout.splitlines()
    return out


def test_tls_job_completes_with_all_three_sites_and_every_signature_verifies(
    deployment: dict[str, Any],
) -> None:
    """Round 1, before any attack: all three sites take part and every signature verifies;
    in every round, each aggregated update is one whose signature verified."""
    s = deployment["faults"]
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    round1 = next(p for p in s["participation"] if p["round"] == 1)
    assert round1["aggregated"] == [0, 1, 2]
    assert not [r for r in s["rejected_updates"] if r["round"] == 1]
    assert not [f for f in s["failures"] if f["round"] == 1]
    verified = s["security"]["verified"]
    assert sorted(verified["1"]["train"]) == [0, 1, 2]
    assert sorted(verified["1"]["evaluate"]) == [0, 1, 2]
    for p in s["participation"]:
        assert sorted(verified[str(p["round"])]["train"]) == p["aggregated"]
    assert s["security"]["sign_updates"] is True
    assert set(s["security"]["site_keys"]) == {"0", "1", "2"}


def test_each_site_trains_on_its_own_file_and_its_held_out_loss_falls(
    deployment: dict[str, Any],
) -> None:
    """Three sites, three local files in three formats and sizes that the run config never
    names (its data.source does not exist): each trained on its own records only, split at
    the site, and the global adapter's loss on each site's held-out records fell."""
    s = deployment["faults"]
    for site, records in SITE_RECORDS.items():
        info = s["sites"][str(site)]
        assert 0 < info["num_examples"] < records  # its own file, less its held-out split
        losses = [x for x in info["eval_loss"] if x is not None]
        assert len(losses) >= 3 and losses[-1] < losses[0], (site, losses)
    assert len({s["sites"][str(k)]["num_examples"] for k in SITE_RECORDS}) == 3


def test_the_superlink_speaks_only_tls_with_the_federations_certificate(
    deployment: dict[str, Any],
) -> None:
    log = deployment["superlink_log"]
    assert "Uvicorn running on https://127.0.0.1" in log
    # A client that does not hold the federation's CA cannot complete the handshake.
    assert deployment["no-ca_rc"] != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment["no-ca_log"]
    assert "SuperNode ID" not in deployment["no-ca_log"]


def test_a_supernode_with_an_unregistered_key_is_refused(deployment: dict[str, Any]) -> None:
    assert deployment["unregistered_rc"] != 0
    assert "SuperNode ID" not in deployment["unregistered_log"]
    assert "No SuperNode found with the given public key" in deployment["superlink_log"]
    # ...and it never took part: only the three registered sites ever replied.
    assert set(deployment["faults"]["sites"]) == {"0", "1", "2"}


def test_replayed_and_tampered_updates_are_rejected_and_the_round_goes_on(
    deployment: dict[str, Any],
) -> None:
    s = deployment["faults"]
    round2 = next(p for p in s["participation"] if p["round"] == 2)
    assert round2["aggregated"] == [0]
    rejected = {r["site"]: r["reason"] for r in s["rejected_updates"]}
    assert set(rejected) == {1, 2}
    assert "replayed update: signed for train round 1, this is train round 2" in rejected[1]
    assert "payload does not match its signature" in rejected[2]
    assert round2["rejected"] == [1, 2]
    assert all(r["round"] == 2 for r in s["rejected_updates"])
    log = deployment["faults_log"]
    assert "rejected train reply: site 1" in log and "rejected train reply: site 2" in log


def test_a_supernode_killed_mid_round_is_named_and_the_run_finishes(
    deployment: dict[str, Any],
) -> None:
    s = deployment["faults"]
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    round3 = next(p for p in s["participation"] if p["round"] == 3)
    assert round3["aggregated"] == [0, 1] and round3["missing"] == [2]
    failure = next(f for f in s["failures"] if f["round"] == 3)
    assert failure["site"] == 2 and failure["phase"] == "train"
    assert "Node Unavailable" in failure["reason"]
    assert "site 2 (node" in deployment["faults_log"]


def test_a_refused_rounds_spend_is_backfilled_and_both_ledgers_verify(
    deployment: dict[str, Any],
) -> None:
    """Site 1 trained in round 2 (its own ledger has the spend) but its reply was a replay:
    its signed round-3 reply carries its history, and the run ledger fills the gap."""
    root = deployment["root"]
    records = Ledger(root / "out" / "faults" / "ledger.jsonl").records()
    backfilled = [r for r in records if r.get("backfilled")]
    assert [(r["site"], r["round"]) for r in backfilled] == [(1, 2)]
    assert cli(["audit", "verify", str(root / "out" / "faults")]) == 0


def test_every_process_the_test_started_is_gone(deployment: dict[str, Any]) -> None:
    assert deployment["leftover"] == []


def test_the_audit_report_states_which_updates_were_signed_and_which_were_rejected(
    deployment: dict[str, Any],
) -> None:
    run = deployment["root"] / "out" / "faults"
    assert cli(["audit", "report", str(run)]) == 0
    md = (run / "audit-report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **Update signatures**"))
    assert "3 registered site keys" in line and "2 rejected" in line
    assert "payload does not match its signature" in line and "replayed update" in line


# -- the sites' own policies, against the coordinator's requests ---------------------------


def _round0_refusals(log: str) -> str:
    """The coordinator's one-line stop at round 0, which names every site's refusal."""
    lines = [x for x in log.splitlines() if "could evaluate the initial adapter" in x]
    assert lines, f"the job did not stop at round 0; its log ends:\n{log[-4000:]}"
    return lines[-1]


def test_a_hostile_coordinators_no_dp_and_path_run_name_are_refused_by_each_sites_rule(
    deployment: dict[str, Any],
) -> None:
    stop = _round0_refusals(deployment["hostile_log"])
    assert "only 0 of 3 sites" in stop
    assert (
        "site 0 refused: site policy" in stop
        and "privacy-modes = ['record'] does not include the requested privacy.mode = 'none'"
        in stop
    )
    site1 = deployment["site_logs"][1]
    node1 = node_id(site1)  # it never answered this run, so the coordinator names its node
    assert f"node {node1}: The FAB could not be verified" in stop  # before any app code ran
    assert "this site refuses run" in site1 and "is not one the site pinned" in site1
    assert site1.count("app is pinned (FAB SHA-256") >= 2  # the first job's and the last's
    assert "site 2 refused: the request cannot be used" in stop
    assert "'run.name' = '../escape' is invalid: must be a plain directory name" in stop
    root = deployment["root"]
    assert not (root / "escape").exists() and not (root / "state" / "escape").exists()
    assert not list(root.rglob("escape"))  # nothing anywhere under the test's folder
    assert not (root / "out" / "hostile").exists()


def test_sigma_below_policy_a_spent_lifetime_budget_and_another_base_model_are_refused(
    deployment: dict[str, Any],
) -> None:
    stop = _round0_refusals(deployment["second_log"])
    assert "only 0 of 3 sites" in stop
    assert "site 0 refused: site policy" in stop
    assert (
        "min-noise-multiplier = 0.8, but the request asks for privacy.noise-multiplier = 0.5"
        in stop
    )
    assert "site 1 refused: site 1, over every run on its records (lifetime)" in stop
    assert "site 2 refused: base model: model.fingerprint = " in stop
    assert "not the run's base model" in stop
    assert deployment["site1_spent"] > 0
    logs = deployment["site_logs"]
    assert "refuses the evaluate request: site policy" in logs[0]
    assert "over every run on its records (lifetime)" in logs[1]
    assert not (deployment["root"] / "out" / "second").exists()


def test_no_refused_request_trained_or_wrote_a_ledger_record(deployment: dict[str, Any]) -> None:
    """Every site's lifetime ledger holds exactly what the first job spent; no site holds a
    ledger of either refused run; a refused evaluation was not counted."""
    before, after = deployment["lifetime_before"], deployment["lifetime_after"]
    assert len(before) == 3 and after == before
    state = deployment["root"] / "state"
    for name in ("hostile", "second"):
        assert not list(state.glob(f"*/{name}")), name
    assert deployment["meter_before"]["runs"]["faults"]["total"] == 4  # rounds 0-3, once each
    assert deployment["meter_after"] == deployment["meter_before"]
