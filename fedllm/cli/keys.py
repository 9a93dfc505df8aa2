"""`fedllm keys ...`: key ceremonies (CKKS keys for HE, the at-rest key)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.config import HEConfig, parse_config
from fedllm.secure.at_rest import make_key_file

__all__ = ["add_parsers"]


def cmd_keys_he_init(args: argparse.Namespace) -> int:
    # heavy: fedllm.secure.he (numpy) takes ~0.4 s to import; keeps `fedllm --help` fast
    from fedllm.secure.he import KEY_FILE, PUBLIC_CONTEXT, SECRET_CONTEXT, write_key_files

    cfg = parse_config(
        {
            "he.poly-modulus-degree": args.poly_modulus_degree,
            "he.coeff-mod-bit-sizes": args.coeff_mod_bit_sizes,
            "he.scale-bits": args.scale_bits,
        }
    )
    out = Path(args.out)
    info = write_key_files(cfg.he.params, out, force=args.force)
    print(f"CKKS key {info['key_id']}")
    print(
        f"  N={info['poly_modulus_degree']}, primes {info['coeff_mod_bit_sizes']} bits, "
        f"scale 2^{info['scale_bits']}"
    )
    print(f"  {out / SECRET_CONTEXT}  (0600) sites only: hand over out of band")
    print(f"  {out / PUBLIC_CONTEXT}  the coordinator: can add ciphertexts, cannot decrypt")
    print(f"  {out / KEY_FILE}  parameters and key id")
    return 0


def cmd_keys_at_rest_init(args: argparse.Namespace) -> int:
    key = make_key_file(Path(args.out), force=args.force)
    print(f"at-rest key {key.id} written to {args.out} (0600, 32 random bytes)")
    print(
        f'  run with security.at-rest-key = "{args.out}": checkpoints and ledgers are then '
        "sealed (AES-256-GCM); keep a copy, without it they cannot be read"
    )
    return 0


def add_parsers(sub: Any) -> None:
    """`keys he-init` and `keys at-rest-init`."""
    keys = verb_group(sub, "keys", "key ceremonies")
    he_init = keys.add_parser(
        "he-init",
        help="make the CKKS keys: a secret context for sites, a public one for the server",
    )
    he_init.add_argument("--out", default="keys/he", help="directory for the key files")
    he_defaults = HEConfig()  # the run config's defaults, so keys and runs agree
    he_init.add_argument("--poly-modulus-degree", type=int, default=he_defaults.poly_modulus_degree)
    he_init.add_argument("--coeff-mod-bit-sizes", default=he_defaults.coeff_mod_bit_sizes)
    he_init.add_argument("--scale-bits", type=int, default=he_defaults.scale_bits)
    he_init.add_argument("--force", action="store_true", help="overwrite existing keys")
    he_init.set_defaults(func=cmd_keys_he_init)
    at_rest_init = keys.add_parser(
        "at-rest-init", help="make the key that seals checkpoints and ledgers at rest"
    )
    at_rest_init.add_argument("--out", default="keys/at-rest.key", help="the key file (0600)")
    at_rest_init.add_argument("--force", action="store_true", help="overwrite an existing key")
    at_rest_init.set_defaults(func=cmd_keys_at_rest_init)
