"""CKKS parameters for additive aggregation, and why a combination is refused.

Pure (no TenSEAL import), so the run config can validate `he.*` keys without loading the
library. The security table is the HomomorphicEncryption.org standard's (Albrecht et al.
2018), which SEAL enforces as `sec_level_type.tc128`: the largest total coefficient modulus
that still gives 128-bit classical security for a ternary secret at each ring degree.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_COEFF_BITS_128", "MIN_HEADROOM_BITS", "MIN_SCALE_BITS", "HEParams", "problems"]

MAX_COEFF_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Fewer fractional bits than this and CKKS's fresh-encryption error (~2^-(scale-7) per slot
# here) is no longer far below a LoRA update's own scale (~1e-4 to 1e-2).
MIN_SCALE_BITS = 20
# Bits above the scale left for the integer part of the *sum*; past them the sum wraps
# modulo the first prime and decrypts to garbage.
MIN_HEADROOM_BITS = 10
SEAL_MAX_PRIME_BITS = 60
SEAL_MIN_PRIME_BITS = 20


@dataclass(frozen=True)
class HEParams:
    """Ring degree N, the coefficient-modulus chain (bits per prime) and the scale 2^s.

    Aggregation only adds ciphertexts, so the chain needs no rescaling levels: one data
    prime and SEAL's special prime (`[60, 60]`) is enough and keeps ciphertexts at 8x fp32.
    Sites weight their values so the weights sum to about 1, so a sum stays as small as
    its largest value: 2^50 gives ~1e-11 absolute error and leaves 10 bits (|sum| < 256).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 50

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def headroom_bits(self) -> int:
        """Bits for the integer part of a sum: first (data) prime minus the scale."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits

    @property
    def max_sum_magnitude(self) -> float:
        """The largest |value| a slot of the sum may reach before it wraps (with margin)."""
        return float(2 ** (self.headroom_bits - 2))

    @classmethod
    def parse(cls, degree: int, chain: str, scale_bits: int) -> HEParams:
        """From the config's spelling: `chain` is comma-separated bit sizes ("60,60")."""
        try:
            bits = tuple(int(x) for x in chain.split(",") if x.strip())
        except ValueError:
            bits = ()
        return cls(poly_modulus_degree=degree, coeff_mod_bit_sizes=bits, scale_bits=scale_bits)


def problems(p: HEParams) -> list[tuple[str, str]]:
    """Each (config key, reason) that makes `p` unusable; empty when it is sound."""
    out: list[tuple[str, str]] = []
    n, chain, s = p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.scale_bits
    if n not in MAX_COEFF_BITS_128:
        out.append(("he.poly-modulus-degree", "must be one of 4096, 8192, 16384, 32768"))
        return out
    if len(chain) < 2:
        out.append(
            (
                "he.coeff-mod-bit-sizes",
                "needs at least two primes, e.g. '60,60': one for the data and SEAL's "
                "special prime",
            )
        )
        return out
    bad = [b for b in chain if not SEAL_MIN_PRIME_BITS <= b <= SEAL_MAX_PRIME_BITS]
    if bad:
        out.append(("he.coeff-mod-bit-sizes", f"primes must be 20 to 60 bits (SEAL), got {bad}"))
    total = sum(chain)
    if total > MAX_COEFF_BITS_128[n]:
        out.append(
            (
                "he.coeff-mod-bit-sizes",
                f"insecure combination: {total} bits of coefficient modulus at N={n} give "
                f"less than 128-bit security (at most {MAX_COEFF_BITS_128[n]} bits allowed); "
                "shorten the chain or raise he.poly-modulus-degree",
            )
        )
    if s < MIN_SCALE_BITS:
        out.append(
            (
                "he.scale-bits",
                f"too few bits for the precision asked: 2^{s} leaves an encryption error "
                f"near 2^-{max(s - 7, 0)}, too coarse for adapter updates (use >= "
                f"{MIN_SCALE_BITS})",
            )
        )
    elif chain[0] - s < MIN_HEADROOM_BITS:
        out.append(
            (
                "he.scale-bits",
                f"the chain is too short for the precision asked: a {chain[0]}-bit first "
                f"prime with scale 2^{s} leaves {chain[0] - s} bits for the integer part of "
                f"the sum (need >= {MIN_HEADROOM_BITS}); lower he.scale-bits or raise the "
                "first prime",
            )
        )
    return out
