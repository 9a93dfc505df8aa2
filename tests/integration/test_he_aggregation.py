"""End-to-end homomorphic aggregation on the Flower Simulation Engine with real TenSEAL.

One run: three sites, record-level DP-SGD and distributed user-level DP, two rounds. Site 2
was handed a secret context from another key ceremony: the coordinator must refuse its
ciphertexts by name and finish with the other two, account only the noise shares that
arrived, never open a file holding the secret key, and keep only ciphertexts on disk; a
site then decrypts the final adapter, which must equal the plaintext mean of exactly what
the two accepted sites encrypted in the last round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger
from fedllm.privacy.verify import verify_records
from fedllm.secure.he import PUBLIC_CONTEXT, SECRET_CONTEXT, write_key_files
from fedllm.secure.he_params import HEParams
from tests.opened import opened_files

pytestmark = pytest.mark.slow

SITES, FOREIGN_SITE, SIGMA, CLIP = 3, 2, 2.0, 0.05
# SIGMA keeps the user-level ε moderate: Opacus' PRV accountant slows down sharply at q = 1
# with ε above ~20 (its discretisation domain grows with ε).


def _client_app(overrides: dict[str, Any], foreign: str, dump: str) -> Any:
    """The real ClientApp functions; site 2 gets the foreign key, and every site records
    what it hands to encryption (in its own process) so the test can recompute the sum."""
    from flwr.clientapp import ClientApp

    import clients.app as client

    app = ClientApp()

    def _for(context: Any) -> dict[str, Any]:
        site = int(context.node_config.get("partition-id", 0))
        return {**overrides, **({"he.site-context": foreign} if site == FOREIGN_SITE else {})}

    def _recording(server_round: int) -> None:
        from fedllm.secure.he_site import SiteHE

        original = SiteHE.__dict__.get("_unpatched_seal", SiteHE.seal)

        def seal(self: SiteHE, arrays: Any, *, weight: float, num_sites: int) -> list[bytes]:
            np.savez(
                Path(dump) / f"site{self.site}-round{server_round}.npz",
                __weight__=weight,
                **{k: np.asarray(v) for k, v in arrays.items()},
            )
            return original(self, arrays, weight=weight, num_sites=num_sites)

        SiteHE._unpatched_seal = original
        SiteHE.seal = seal

    @app.train()
    def _train(msg: Any, context: Any) -> Any:
        _recording(int(msg.content["config"]["server-round"]))
        return client.train(msg, context, _for(context))

    @app.evaluate()
    def _evaluate(msg: Any, context: Any) -> Any:
        return client.evaluate(msg, context, _for(context))

    return app


@pytest.fixture(scope="module")
def he_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.simulate import simulate

    root = tmp_path_factory.mktemp("he")
    keys, foreign, dump = root / "keys", root / "foreign-keys", root / "sealed"
    dump.mkdir()
    params = HEParams()
    write_key_files(params, keys)
    write_key_files(params, foreign)
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "tiny-he",
        "run.output-dir": str(root / "runs"),
        "run.rounds": 2,
        "train.local-steps": 2,
        "privacy.mode": "record+user",
        "privacy.noise-multiplier": 0.7,
        "privacy.user-noise-multiplier": SIGMA,
        "privacy.user-clip": CLIP,
        "strategy.secure-aggregation": "he",
        "he.public-context": str(keys / PUBLIC_CONTEXT),
        "he.site-context": str(keys / SECRET_CONTEXT),
        "data.max-length": 256,
        "eval.max-examples": 8,
    }
    with opened_files() as opened:
        simulate(
            overrides,
            sites=SITES,
            client_app=_client_app(overrides, str(foreign / SECRET_CONTEXT), str(dump)),
        )
    run_dir = root / "runs" / "tiny-he"
    return {
        "dir": run_dir,
        "overrides": overrides,
        "client": (str(foreign / SECRET_CONTEXT), str(dump)),
        "keys": keys,
        "dump": dump,
        "opened": opened,
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def test_foreign_key_site_is_refused_by_name_and_the_run_finishes_with_the_rest(
    he_run: dict[str, Any],
) -> None:
    """Site 2's ciphertexts are rejected with the reason, the rounds complete with sites 0
    and 1, and the encrypted sum only ever held their contributions."""
    summary = he_run["summary"]
    rounds = summary["secure_aggregation"]["rounds"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert [r["contributors"] for r in rounds] == [[0, 1], [0, 1]]
    problems = summary.get("rejected_updates", []) + summary.get("failures", [])
    texts = [f"{p.get('sender', p.get('node'))}: {p['reason']}" for p in problems]
    assert any("site 2" in t and "key" in t for t in texts), texts


def test_distributed_noise_is_accounted_at_the_shares_that_arrived(
    he_run: dict[str, Any],
) -> None:
    """Two of three noise shares arrive, so each user-level ledger record accounts
    z = sigma * sqrt(1/3) (what a curious contributing site still faces, the default),
    states sigma * sqrt(2/3) (every share present) beside it, never the planned sigma, and
    the ledger verifies."""
    records = Ledger(he_run["dir"] / "ledger.jsonl").records()
    user = [r for r in records if r["mechanism"] == USER_GAUSSIAN]
    assert [r["round"] for r in user] == [1, 2]
    for r in user:
        assert r["noise_multiplier"] == pytest.approx(SIGMA * math.sqrt(1 / 3))
        assert r["noise_multiplier_all_shares"] == pytest.approx(SIGMA * math.sqrt(2 / 3))
        assert r["noise_shares"] == "2/3" and r["sample_rate"] == 1.0
    assert verify_records(records) == []
    assert he_run["summary"]["user_level"]["epsilon"] == pytest.approx(user[-1]["guarantee"])
    from fedllm.privacy.audit.report import build_report

    _, md, problems = build_report(he_run["dir"])
    text = md.read_text()
    assert problems == [] and "shares per round: 2/3, 2/3" in text
    assert "summed ciphertexts and stored only ciphertexts" in text


def test_server_never_opens_the_secret_key_and_stores_only_ciphertexts(
    he_run: dict[str, Any],
) -> None:
    """The coordinator process read the public context but no secret context; its
    checkpoints hold ciphertexts only, which its own context cannot decrypt."""
    import tenseal as ts

    from fedllm.secure.he_checkpoint import load_encrypted_adapter

    opened = [Path(p).name for p in he_run["opened"]]
    assert PUBLIC_CONTEXT in opened
    assert SECRET_CONTEXT not in opened
    final = Path(he_run["summary"]["adapter"]["final_checkpoint"])
    assert sorted(p.name for p in final.iterdir()) == ["encrypted_adapter.safetensors"]
    adapter = load_encrypted_adapter(final)
    public = ts.context_from((he_run["keys"] / PUBLIC_CONTEXT).read_bytes())
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, adapter.blobs[0]).decrypt()


def test_site_decrypts_the_mean_of_exactly_what_the_accepted_sites_encrypted(
    he_run: dict[str, Any], tmp_path: Path
) -> None:
    """`fedllm he decrypt` gives a peft adapter whose B equals the plaintext mean of the
    sites' last-round contributions within 1e-6 of their scale; A is the shared seed's."""
    from safetensors.numpy import load_file

    from fedllm.cli import main

    out = tmp_path / "adapter"
    code = main(
        [
            "he",
            "decrypt",
            str(he_run["dir"]),
            "--context",
            str(he_run["keys"] / SECRET_CONTEXT),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    decrypted = load_file(str(out / "adapter_model.safetensors"))
    sealed = [np.load(he_run["dump"] / f"site{s}-round2.npz") for s in (0, 1)]
    assert all(float(z["__weight__"]) == pytest.approx(1 / SITES) for z in sealed)
    names = [n for n in sealed[0].files if n != "__weight__"]
    scale = max(float(np.abs(z[n]).max()) for z in sealed for n in names)
    for name in names:
        expected = (sealed[0][name] + sealed[1][name]) / 2
        assert np.abs(decrypted[name] - expected).max() <= 1e-6 * scale, name
    assert any(".lora_A." in n for n in decrypted)  # the full adapter, not only what travelled
    run = str(he_run["dir"])
    assert main(["generate", "--run", run, "--max-new-tokens", "2", "Hi"]) == 2  # encrypted
    assert (
        main(["generate", "--run", run, "--adapter", str(out), "--max-new-tokens", "2", "Hi"]) == 0
    )
    foreign = he_run["client"][0]
    refused = tmp_path / "refused"
    args = ["he", "decrypt", str(he_run["dir"]), "--context", foreign, "--out", str(refused)]
    assert main(args) == 2  # a key from another ceremony: refused, nothing written
    assert not refused.exists()


def test_rerun_resumes_from_the_encrypted_checkpoint(he_run: dict[str, Any]) -> None:
    """Raising run.rounds resumes from round 2's ciphertexts (the server never had more):
    one more round is summed, accounted and checkpointed encrypted. Runs last: it extends
    the shared run."""
    from tests.simulate import simulate

    overrides = {**he_run["overrides"], "run.rounds": 3}
    simulate(overrides, sites=SITES, client_app=_client_app(overrides, *he_run["client"]))
    summary = json.loads((he_run["dir"] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert [r["round"] for r in summary["secure_aggregation"]["rounds"]] == [1, 2, 3]
    records = Ledger(he_run["dir"] / "ledger.jsonl").records()
    assert [r["round"] for r in records if r["mechanism"] == USER_GAUSSIAN] == [1, 2, 3]
    assert verify_records(records) == []
    final = Path(summary["adapter"]["final_checkpoint"])
    assert final.name == "round-3" and (final / "encrypted_adapter.safetensors").is_file()
