"""A site's side of homomorphic aggregation: open the encrypted global, seal its update.

Independent of Flower (the ClientApp maps records to these calls). The site holds the CKKS
secret context; it checks the coordinator's key id against its own before decrypting, and
the check slots of every chunk after, so an aggregate that mixes in a foreign-key or
corrupted contribution is refused, never trained on.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.config import FedllmConfig
from fedllm.errors import InvalidUpdateError, KeyFileError, ProtectionUnavailableError
from fedllm.model import adapter_spec, init_adapter
from fedllm.secure.at_rest import AtRestKey
from fedllm.secure.he import decrypt_chunks, encrypt_chunks, key_id, load_secret_context
from fedllm.secure.he_checkpoint import load_encrypted_adapter
from fedllm.secure.he_params import HEParams
from fedllm.secure.packing import Packing

__all__ = ["SiteHE"]


@dataclass(frozen=True)
class SiteHE:
    """The site's secret context, its key id and the run's packing layout."""

    ctx: Any
    key: str
    packing: Packing
    params: HEParams
    site: int

    @classmethod
    def load(cls, cfg: FedllmConfig, context_path: str, *, site: int) -> SiteHE:
        """Loaded once per process and file version (a simulated node serves many rounds)."""
        path = Path(context_path).expanduser().resolve()
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = 0
        ctx, key = _load(str(path), mtime, cfg.he.params)
        spec = adapter_spec(cfg.model, cfg.lora)
        shapes = {n: spec.shapes[n] for n in spec.sent}
        packing = Packing.for_arrays(shapes, cfg.he.params.slots)
        return cls(ctx=ctx, key=key, packing=packing, params=cfg.he.params, site=site)

    def open_global(
        self, blobs: list[bytes], *, divisor: float, server_key: str, max_norm: float = math.inf
    ) -> dict[str, np.ndarray]:
        """Decrypt the coordinator's aggregate and divide by its public total weight; the
        result is checked before the site trains on it (the coordinator cannot check an
        aggregate it cannot read): finite, and of L2 norm at most `max_norm`.

        Raises
        ------
        InvalidUpdateError
            If the decrypted global adapter holds NaN or infinite values, or is too large.
        """
        if server_key != self.key:
            raise KeyFileError(
                f"site {self.site}: the coordinator aggregates under HE key {server_key[:12]}..."
                f" but this site's context has key {self.key[:12]}...; install the current "
                "secret.context from the key ceremony."
            )
        what = f"site {self.site}: the encrypted global adapter"
        arrays = self.packing.unpack(decrypt_chunks(self.ctx, blobs, what=what), divisor, what=what)
        if not all(np.all(np.isfinite(a)) for a in arrays.values()):
            raise InvalidUpdateError(f"{what} decrypts to NaN or infinite values; refusing it.")
        norm = math.sqrt(
            sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())
        )
        if norm > max_norm:
            raise InvalidUpdateError(
                f"{what} decrypts to L2 norm {norm:.4g}, above the {max_norm:g} this site "
                "accepts (validate.max-update-norm per round); refusing it."
            )
        return arrays

    def seal(
        self, arrays: Mapping[str, np.ndarray], *, weight: float, num_sites: int
    ) -> list[bytes]:
        """Encrypt `weight * arrays`, refusing values the sum of `num_sites` could overflow."""
        peak = max(max(float(np.max(np.abs(a))) for a in arrays.values()) * weight, weight)
        limit = self.params.max_sum_magnitude / max(1, num_sites)
        if not np.isfinite(peak) or peak > limit:
            raise ProtectionUnavailableError(
                f"site {self.site}: weighted update peak {peak:.4g} could overflow the "
                f"encrypted sum of {num_sites} sites (limit {limit:.4g} per site with "
                f"he.scale-bits = {self.params.scale_bits}); lower he.scale-bits or raise "
                "the first prime of he.coeff-mod-bit-sizes."
            )
        return encrypt_chunks(self.ctx, self.packing.pack(dict(arrays), weight))


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: int, params: HEParams) -> tuple[Any, str]:
    del mtime  # part of the cache key only: a replaced key file is read again
    ctx = load_secret_context(Path(path), params)
    return ctx, key_id(ctx)


def decrypt_adapter(
    cfg: FedllmConfig, checkpoint: Path, context_path: str, *, at_rest: AtRestKey | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A site's plaintext copy of an encrypted checkpoint: every LoRA tensor (A from the
    shared seed, B decrypted), and facts about what was decrypted. `at_rest` opens a
    checkpoint that is also sealed at rest."""
    adapter = load_encrypted_adapter(checkpoint, at_rest=at_rest)
    he = SiteHE.load(cfg, context_path, site=-1)
    if adapter.packing != he.packing:
        raise KeyFileError(
            f"{checkpoint} holds another adapter layout than the run's config describes."
        )
    what = f"checkpoint {checkpoint}"
    if adapter.key != he.key:
        raise KeyFileError(
            f"{what} was encrypted under key {adapter.key[:12]}..., but {context_path} has key "
            f"{he.key[:12]}...; use the secret.context of this run's key ceremony."
        )
    chunks = decrypt_chunks(he.ctx, adapter.blobs, what=what)
    sent = he.packing.unpack(chunks, adapter.divisor, what=what)
    full = init_adapter(adapter_spec(cfg.model, cfg.lora), seed=cfg.run.seed)
    full.update(sent)
    facts = {"key_id": adapter.key, "total_weight": adapter.divisor, "ciphertexts": len(chunks)}
    return full, facts
