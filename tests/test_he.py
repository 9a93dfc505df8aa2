"""Homomorphic aggregation (real TenSEAL CKKS): keys, exactness, and refusal of bad input."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from fedllm.config import parse_config
from fedllm.errors import ConfigError, InvalidUpdateError, KeyFileError
from fedllm.privacy.distributed import (
    effective_noise_multiplier,
    noisy_clipped_contribution,
    site_noise_std,
)
from fedllm.secure.he import (
    PUBLIC_CONTEXT,
    SECRET_CONTEXT,
    EncryptedSum,
    decrypt_chunks,
    encrypt_chunks,
    key_id,
    load_public_context,
    load_secret_context,
    make_secret_context,
    payload_digest,
    write_key_files,
)
from fedllm.secure.he_checkpoint import (
    EncryptedAdapter,
    load_encrypted_adapter,
    save_encrypted_adapter,
)
from fedllm.secure.he_params import HEParams
from fedllm.secure.packing import Packing

PARAMS = HEParams()
# Two LoRA B matrices that together span three CKKS ciphertexts (4095 values each).
SHAPES = OrderedDict(
    [
        ("base_model.model.layers.0.q_proj.lora_B.weight", (576, 8)),
        ("base_model.model.layers.0.v_proj.lora_B.weight", (576, 8)),
    ]
)
A = np.random.default_rng(7).uniform(-0.1, 0.1, size=(8, 64))  # frozen FFA-LoRA A (shared)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("he-keys")
    write_key_files(PARAMS, out)
    return out


@pytest.fixture(scope="module")
def secret(keys: Path) -> object:
    return load_secret_context(keys / SECRET_CONTEXT, PARAMS)


@pytest.fixture(scope="module")
def public(keys: Path) -> object:
    return load_public_context(keys / PUBLIC_CONTEXT, PARAMS)


def _updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.normal(0, 1e-2, s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)
    ]


def _sealed(ctx: object, update: dict[str, np.ndarray], weight: float) -> list[bytes]:
    return encrypt_chunks(ctx, Packing.for_arrays(SHAPES, PARAMS.slots).pack(update, weight))


def _add(total: EncryptedSum, blobs: list[bytes], weight: float, key: str, site: int) -> None:
    """Add as the server does, with the digest an honest transport would deliver."""
    total.add(
        blobs,
        weight=weight,
        key=key,
        digest=payload_digest(blobs),
        sender=f"site {site}",
        site=site,
    )


def _sum(public: object, secret: object) -> EncryptedSum:
    return EncryptedSum(
        public, key_id(secret), Packing.for_arrays(SHAPES, PARAMS.slots).chunk_sizes
    )


def _open(secret: object, total: EncryptedSum) -> dict[str, np.ndarray]:
    packing = Packing.for_arrays(SHAPES, PARAMS.slots)
    chunks = decrypt_chunks(secret, total.blobs(), what="aggregate")
    return packing.unpack(chunks, total.weight)


# -- the key ceremony ---------------------------------------------------------------------


def test_server_context_cannot_decrypt_and_holds_no_secret_key(
    keys: Path, secret: object, public: object
) -> None:
    """What the coordinator loads has no secret key: adding works, decrypting raises."""
    import tenseal as ts

    blob = _sealed(secret, _updates(1)[0], 1.0)[0]
    on_server = ts.ckks_vector_from(public, blob)
    total = on_server + on_server
    assert not public.is_private() and not public.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        total.decrypt()
    assert ts.context_from((keys / PUBLIC_CONTEXT).read_bytes()).has_secret_key() is False
    assert key_id(public) == key_id(secret)


def test_server_refuses_to_start_with_a_context_holding_the_secret_key(keys: Path) -> None:
    with pytest.raises(KeyFileError, match="holds the CKKS secret key.*Refusing to start"):
        load_public_context(keys / SECRET_CONTEXT, PARAMS)


def test_secret_context_readable_by_others_is_refused(keys: Path, tmp_path: Path) -> None:
    leaky = tmp_path / SECRET_CONTEXT
    leaky.write_bytes((keys / SECRET_CONTEXT).read_bytes())
    os.chmod(leaky, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_secret_context(leaky, PARAMS)


def test_key_files_are_private_and_never_silently_overwritten(keys: Path) -> None:
    assert (keys / SECRET_CONTEXT).stat().st_mode & 0o077 == 0
    with pytest.raises(KeyFileError, match="--force"):
        write_key_files(PARAMS, keys)


def test_context_with_other_parameters_than_the_config_is_refused(keys: Path) -> None:
    other = HEParams(coeff_mod_bit_sizes=(60, 40, 60))
    with pytest.raises(KeyFileError, match="primes 2 \\(config 3\\)"):
        load_public_context(keys / PUBLIC_CONTEXT, other)


@pytest.mark.parametrize(
    ("flat", "reason"),
    [
        ({"he.coeff-mod-bit-sizes": "60,60,60,60"}, "insecure combination: 240 bits"),
        ({"he.poly-modulus-degree": 4096, "he.coeff-mod-bit-sizes": "60,60"}, "insecure"),
        ({"he.scale-bits": 12}, "too few bits for the precision asked"),
        ({"he.scale-bits": 55}, "leaves 5 bits for the integer part"),
        ({"he.coeff-mod-bit-sizes": "60"}, "at least two primes"),
        ({"he.coeff-mod-bit-sizes": "61,60"}, "20 to 60 bits"),
        ({"he.poly-modulus-degree": 6000}, "one of 4096"),
    ],
)
def test_unsafe_he_parameters_are_refused_with_the_reason(
    flat: dict[str, object], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(flat)


@pytest.mark.parametrize(
    ("flat", "reason"),
    [
        ({"strategy.name": "fedadam"}, "needs the aggregate in plaintext"),
        ({"lora.ffa": False}, "FFA-LoRA"),
        ({"privacy.mode": "user", "privacy.user-clipping": "adaptive"}, "fixed"),
        ({"privacy.mode": "user", "strategy.fraction-train": 0.5}, "every site every round"),
        ({"privacy.mode": "user", "audit.canary-clients": 100}, "canaries"),
    ],
)
def test_what_he_cannot_do_is_refused_not_downgraded(flat: dict[str, object], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config({"strategy.secure-aggregation": "he", **flat})


# -- exactness ----------------------------------------------------------------------------


def test_decrypted_aggregate_equals_plaintext_fedavg_of_ffa_lora_updates(
    secret: object, public: object
) -> None:
    """The example-weighted FedAvg of B computed under encryption matches Flower's plaintext
    FedAvg to 1e-6 of the update scale, and with A frozen that *is* the mean of B·A."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedllm.wire import arrays_to_record, record_to_arrays

    updates, weights = _updates(3), [1042.0, 648.0, 97.0]
    total = _sum(public, secret)
    for site, (u, w) in enumerate(zip(updates, weights, strict=True)):
        _add(total, _sealed(secret, u, w), w, key_id(secret), site)
    decrypted = _open(secret, total)
    replies = [
        RecordDict({"arrays": arrays_to_record(u), "metrics": MetricRecord({"n": w})})
        for u, w in zip(updates, weights, strict=True)
    ]
    plain = record_to_arrays(aggregate_arrayrecords(replies, "n"))
    scale = max(float(np.abs(u[k]).max()) for u in updates for k in SHAPES)
    for k in SHAPES:
        assert np.abs(decrypted[k] - plain[k]).max() <= 1e-6 * scale
    name = next(iter(SHAPES))
    mean_of_products = sum(w * (u[name] @ A) for u, w in zip(updates, weights, strict=True))
    mean_of_products /= sum(weights)
    assert np.abs(decrypted[name] @ A - mean_of_products).max() <= 1e-6 * scale


def test_plain_lora_factor_averaging_is_not_the_average_update() -> None:
    """Why HE mode trains FFA-LoRA: averaging A and B separately misses mean(B_k A_k)."""
    rng = np.random.default_rng(1)
    b = [rng.normal(size=(16, 4)) for _ in range(3)]
    a = [rng.normal(size=(4, 16)) for _ in range(3)]
    true_mean = sum(bk @ ak for bk, ak in zip(b, a, strict=True)) / 3
    assert np.abs(true_mean - (sum(b) / 3) @ (sum(a) / 3)).max() > 0.1


def test_packing_fills_every_slot_and_keeps_one_check_slot_per_ciphertext() -> None:
    packing = Packing.for_arrays(SHAPES, PARAMS.slots)
    chunks = packing.pack(_updates(1)[0], 3.0)
    assert packing.chunk_sizes == [4096, 4096, 9216 - 2 * 4095 + 1]
    assert [c.size for c in chunks] == packing.chunk_sizes
    assert all(c[-1] == 3.0 for c in chunks)


# -- bad input ----------------------------------------------------------------------------


def test_each_bad_contribution_is_refused_naming_the_site_and_the_sum_is_untouched(
    secret: object, public: object
) -> None:
    """A foreign key, another parameter set, a short vector, corrupted bytes, a missing
    ciphertext, a bad weight: each refused by name, and the sum still decrypts exactly to
    the one good contribution."""
    good = _updates(1)[0]
    total = _sum(public, secret)
    _add(total, _sealed(secret, good, 2.0), 2.0, key_id(secret), 0)
    foreign = make_secret_context(PARAMS)
    deeper = make_secret_context(HEParams(coeff_mod_bit_sizes=(60, 40, 60)))
    blobs = _sealed(secret, good, 1.0)
    corrupted = bytearray(blobs[1])
    corrupted[len(corrupted) // 2 : len(corrupted) // 2 + 64] = bytes(64)
    short = Packing.for_arrays({"x": (100,)}, PARAMS.slots)
    cases = {
        "under key": (_sealed(foreign, good, 1.0), 1.0, key_id(foreign)),
        "parameters": (_sealed(deeper, good, 1.0), 1.0, key_id(secret)),
        "length 101": (
            encrypt_chunks(secret, short.pack({"x": np.ones(100)}, 1.0)) * 3,
            1.0,
            key_id(secret),
        ),
        "corrupted": ([blobs[0], bytes(corrupted), blobs[2]], 1.0, key_id(secret)),
        "sent 2 ciphertexts": (blobs[:2], 1.0, key_id(secret)),
        "weight": (blobs, float("nan"), key_id(secret)),
    }
    for i, (why, (payload, weight, key)) in enumerate(cases.items(), start=1):
        digest = payload_digest(blobs) if why == "corrupted" else payload_digest(payload)
        with pytest.raises(InvalidUpdateError, match=f"site {i}.*{why}|{why}.*site {i}"):
            total.add(payload, weight=weight, key=key, digest=digest, sender=f"site {i}", site=i)
    assert total.contributors == [0] and total.weight == 2.0
    opened = _open(secret, total)
    for k in SHAPES:
        assert np.abs(opened[k] - good[k]).max() <= 1e-7


def test_foreign_key_ciphertext_with_a_forged_key_id_fails_the_sites_integrity_check(
    secret: object, public: object
) -> None:
    """The server cannot tell a same-parameter ciphertext under another key (CKKS is
    semantically secure); the check slots catch it when a site decrypts, and nothing is
    used."""
    foreign = make_secret_context(PARAMS)
    total = _sum(public, secret)
    u = _updates(2)
    _add(total, _sealed(secret, u[0], 1.0), 1.0, key_id(secret), 0)
    _add(total, _sealed(foreign, u[1], 1.0), 1.0, key_id(secret), 1)
    with pytest.raises(InvalidUpdateError, match="failed its integrity check in chunk 0"):
        _open(secret, total)


def test_encrypted_checkpoint_round_trips_without_plaintext(
    secret: object, public: object, tmp_path: Path
) -> None:
    total = _sum(public, secret)
    u = _updates(1)[0]
    _add(total, _sealed(secret, u, 5.0), 5.0, key_id(secret), 0)
    packing = Packing.for_arrays(SHAPES, PARAMS.slots)
    adapter = EncryptedAdapter(total.blobs(), total.weight, key_id(secret), packing)
    save_encrypted_adapter(tmp_path / "round-1", adapter, model="m")
    back = load_encrypted_adapter(tmp_path / "round-1")
    assert back == adapter
    raw = (tmp_path / "round-1" / "encrypted_adapter.safetensors").read_bytes()
    assert np.asarray(u[next(iter(SHAPES))]).tobytes()[:64] not in raw
    opened = packing.unpack(decrypt_chunks(secret, back.blobs, what="c"), back.divisor)
    assert np.abs(opened[next(iter(SHAPES))] - u[next(iter(SHAPES))]).max() <= 1e-7


# -- distributed DP -----------------------------------------------------------------------


def test_noise_shares_of_all_sites_sum_to_the_central_noise() -> None:
    """n sites each adding N(0, σ²S²/n) give a sum with std σS (within 2%), and every
    site's update is clipped to S first."""
    sigma, clip, n = 0.8, 0.5, 5
    rng = np.random.default_rng(3)
    zeros = {"w": np.zeros(40_000)}
    big = {"w": np.full(40_000, 10.0)}
    total = sum(
        noisy_clipped_contribution(
            zeros, zeros, clip_norm=clip, noise_multiplier=sigma, num_sites=n, rng=rng
        )[0]["w"]
        for _ in range(n)
    )
    assert np.std(total) == pytest.approx(sigma * clip, rel=0.02)
    assert site_noise_std(sigma, clip, n) == pytest.approx(sigma * clip / math.sqrt(n))
    clipped, norm = noisy_clipped_contribution(
        zeros, big, clip_norm=clip, noise_multiplier=0.0, num_sites=n, rng=rng
    )
    assert norm == pytest.approx(2000.0) and np.linalg.norm(clipped["w"]) == pytest.approx(clip)


def test_dropped_noise_shares_lower_the_accounted_noise_multiplier() -> None:
    assert effective_noise_multiplier(1.2, 3, 3) == pytest.approx(1.2)
    assert effective_noise_multiplier(1.2, 2, 3) == pytest.approx(1.2 * math.sqrt(2 / 3))
    # a share from a site that joined after the start adds noise (issue 15: never raises)
    assert effective_noise_multiplier(1.2, 4, 3) == pytest.approx(1.2 * math.sqrt(4 / 3))
    with pytest.raises(ValueError):
        effective_noise_multiplier(1.2, -1, 3)


def test_keys_he_init_cli_writes_the_ceremony_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedllm.cli import main

    out = tmp_path / "he"
    assert main(["keys", "he-init", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert key_id(load_secret_context(out / SECRET_CONTEXT, PARAMS)) in printed
    assert (out / SECRET_CONTEXT).stat().st_mode & 0o777 == 0o600
    assert main(["keys", "he-init", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["keys", "he-init", "--out", str(tmp_path / "x"), "--scale-bits", "56"]) == 2
    assert "integer part" in capsys.readouterr().err
