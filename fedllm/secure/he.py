"""CKKS contexts, key files and the ciphertext operations of homomorphic aggregation (TenSEAL).

Threat model: an honest-but-curious coordinator. Sites share one CKKS secret key, made by
`fedllm keys he-init` and handed to them out of band; the coordinator holds only the public
context (public key and parameters, no secret key), so it can add ciphertexts and nothing
else. CKKS is semantically secure: without the secret key the server can neither read an
update nor tell a ciphertext under another key from a valid one, which is why every
contribution names its key id and carries check slots (`fedllm.secure.packing`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.errors import InvalidUpdateError, KeyFileError, ProtectionUnavailableError
from fedllm.secure.he_params import HEParams, problems
from fedllm.secure.keyfiles import check_private, write_new

__all__ = [
    "KEY_FILE",
    "PUBLIC_CONTEXT",
    "SECRET_CONTEXT",
    "EncryptedSum",
    "context_params",
    "decrypt_chunks",
    "encrypt_chunks",
    "key_id",
    "load_public_context",
    "load_secret_context",
    "make_secret_context",
    "payload_digest",
    "public_context_bytes",
    "write_key_files",
]

SECRET_CONTEXT = "secret.context"
PUBLIC_CONTEXT = "public.context"
KEY_FILE = "key.json"


def _tenseal() -> Any:
    try:
        # optional: only HE runs need TenSEAL, whose wheels exist for Python 3.11-3.13 only
        import tenseal as ts
    except ImportError as e:  # pragma: no cover - tenseal is a hard dependency
        raise ProtectionUnavailableError(
            "homomorphic aggregation was requested but TenSEAL cannot be imported; "
            "reinstall with ./install.sh."
        ) from e
    return ts


def make_secret_context(params: HEParams) -> Any:
    """A fresh CKKS context holding a new secret key (for the sites only)."""
    reasons = problems(params)
    if reasons:
        key, why = reasons[0]
        raise KeyFileError(f"cannot make HE keys: '{key}' {why}.")
    ts = _tenseal()
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = float(2**params.scale_bits)
    return ctx


def public_context_bytes(ctx: Any) -> bytes:
    """Parameters and public key only: no secret, relinearisation or Galois keys (addition
    needs none of them). Deterministic for a given key, so it also names the key."""
    return bytes(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def key_id(ctx: Any) -> str:
    """SHA-256 of the public context: the same on every site and the server for one key."""
    return hashlib.sha256(public_context_bytes(ctx)).hexdigest()


def context_params(ctx: Any) -> tuple[int, int, int, int]:
    """(N, total coefficient bits, number of primes, scale bits) of a loaded context."""
    data = ctx.seal_context().data
    key_level = data.key_context_data()
    degree = int(key_level.parms().poly_modulus_degree())
    return (
        degree,
        int(key_level.total_coeff_modulus_bit_count()),
        int(key_level.chain_index()) + 1,
        int(round(np.log2(ctx.global_scale))),
    )


def _expect(params: HEParams) -> tuple[int, int, int, int]:
    chain = params.coeff_mod_bit_sizes
    return params.poly_modulus_degree, sum(chain), len(chain), params.scale_bits


def write_key_files(params: HEParams, out_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """The key ceremony: `secret.context` (0600, for the sites, out of band),
    `public.context` (for the coordinator) and `key.json` (parameters and key id)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (SECRET_CONTEXT, PUBLIC_CONTEXT, KEY_FILE):
        if (out_dir / name).exists() and not force:
            raise KeyFileError(
                f"{out_dir / name} exists; refusing to overwrite keys (use --force)."
            )
    ctx = make_secret_context(params)
    public = public_context_bytes(ctx)
    info = {
        "scheme": "CKKS",
        "key_id": hashlib.sha256(public).hexdigest(),
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "scale_bits": params.scale_bits,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {
            SECRET_CONTEXT: "sites only: holds the secret key; hand it over out of band",
            PUBLIC_CONTEXT: "coordinator: public key and parameters, cannot decrypt",
        },
    }
    write_new(
        out_dir / SECRET_CONTEXT, bytes(ctx.serialize(save_secret_key=True)), 0o600, force=force
    )
    write_new(out_dir / PUBLIC_CONTEXT, public, 0o644, force=force)
    write_new(out_dir / KEY_FILE, json.dumps(info, indent=2).encode(), 0o644, force=force)
    return info


def _read_context(path: Path, role: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(
            f"no HE context at {path} (the {role}); make keys with `fedllm keys he-init` "
            "or point he.* / the node config at the right file."
        )
    try:
        return _tenseal().context_from(path.read_bytes())
    except (ValueError, RuntimeError, TypeError) as e:
        raise KeyFileError(f"{path} is not a TenSEAL context ({e}).") from e


def _check_params(ctx: Any, params: HEParams, path: Path) -> None:
    got, want = context_params(ctx), _expect(params)
    if got != want:
        names = ("N", "coefficient bits", "primes", "scale bits")
        diff = ", ".join(
            f"{n} {g} (config {w})" for n, g, w in zip(names, got, want, strict=True) if g != w
        )
        raise KeyFileError(
            f"{path} was made with other parameters than he.* in the run config: {diff}."
        )


def load_public_context(path: Path, params: HEParams) -> Any:
    """The coordinator's context. Refused if it holds a secret key: the server must never
    be able to decrypt."""
    ctx = _read_context(path, "coordinator's public context")
    if ctx.is_private():
        raise KeyFileError(
            f"{path} holds the CKKS secret key; the coordinator must only be given "
            f"{PUBLIC_CONTEXT} from `fedllm keys he-init`. Refusing to start."
        )
    _check_params(ctx, params, path)
    return ctx


def load_secret_context(path: Path, params: HEParams) -> Any:
    """A site's context, with the secret key; refused if the file is readable by others."""
    path = Path(path)
    ctx = _read_context(path, "site's secret context")
    if not ctx.is_private():
        raise KeyFileError(f"{path} holds no secret key; a site needs {SECRET_CONTEXT}.")
    check_private(path, "the CKKS secret key")
    _check_params(ctx, params, path)
    return ctx


def encrypt_chunks(ctx: Any, chunks: Sequence[np.ndarray]) -> list[bytes]:
    ts = _tenseal()
    return [bytes(ts.ckks_vector(ctx, chunk.tolist()).serialize()) for chunk in chunks]


def payload_digest(blobs: Sequence[bytes]) -> str:
    """SHA-256 over the length-prefixed ciphertexts. A ciphertext whose bytes were damaged
    often still parses (its coefficients stay below the modulus) and would decrypt to
    garbage; the digest the site sends with it catches that before it touches the sum.
    It guards against corruption, not forgery: signatures do that."""
    h = hashlib.sha256()
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def decrypt_chunks(ctx: Any, blobs: Sequence[bytes], *, what: str) -> list[np.ndarray]:
    """Decrypt with the secret context; a blob that does not parse is refused by name."""
    ts = _tenseal()
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(np.asarray(ts.ckks_vector_from(ctx, blob).decrypt(), dtype=np.float64))
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidUpdateError(f"{what}: chunk {i} is not a valid ciphertext ({e}).") from e
    return out


@dataclass
class EncryptedSum:
    """The coordinator's running sum of encrypted contributions, in the public context.

    A contribution is checked whole (key id, chunk count, every chunk parses under the
    public context and has the expected length, addition succeeds) before it touches the
    sum, so a refused one leaves the sum exactly as it was.
    """

    ctx: Any
    key: str
    sizes: list[int]
    weight: float = 0.0
    contributors: list[int] = field(default_factory=list)
    _sum: list[Any] | None = None

    def add(
        self,
        blobs: Sequence[bytes],
        *,
        weight: float,
        key: str,
        digest: str,
        sender: str,
        site: int,
    ) -> None:
        """Add one site's contribution, or raise `InvalidUpdateError` naming it and why."""
        if key != self.key:
            raise InvalidUpdateError(
                f"{sender}: encrypted under key {key[:12]}..., but this federation's key is "
                f"{self.key[:12]}...; give the site the current {SECRET_CONTEXT}."
            )
        if not (np.isfinite(weight) and weight > 0):
            raise InvalidUpdateError(f"{sender}: weight {weight!r} must be positive and finite.")
        if len(blobs) != len(self.sizes):
            raise InvalidUpdateError(
                f"{sender}: sent {len(blobs)} ciphertexts, expected {len(self.sizes)}."
            )
        got = payload_digest(blobs)
        if got != digest:
            raise InvalidUpdateError(
                f"{sender}: ciphertext payload is corrupted (SHA-256 {got[:12]}... differs from "
                f"the {str(digest)[:12]}... the site computed)."
            )
        ts = _tenseal()
        vectors = []
        for i, (blob, size) in enumerate(zip(blobs, self.sizes, strict=True)):
            try:
                vec = ts.ckks_vector_from(self.ctx, blob)
            except (ValueError, RuntimeError, TypeError) as e:
                raise InvalidUpdateError(
                    f"{sender}: ciphertext {i} is corrupted or not made under this "
                    f"federation's parameters ({e})."
                ) from e
            if vec.size() != size:
                raise InvalidUpdateError(
                    f"{sender}: ciphertext {i} encrypts a vector of length {vec.size()}, "
                    f"expected {size}."
                )
            vectors.append(vec)
        try:
            total = (
                vectors
                if self._sum is None
                else [a + b for a, b in zip(self._sum, vectors, strict=True)]
            )
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidUpdateError(f"{sender}: ciphertexts cannot be added ({e}).") from e
        self._sum = total
        self.weight += float(weight)
        self.contributors.append(site)

    def blobs(self) -> list[bytes]:
        if self._sum is None:
            raise InvalidUpdateError("no encrypted contribution was accepted this round.")
        return [bytes(v.serialize()) for v in self._sum]
