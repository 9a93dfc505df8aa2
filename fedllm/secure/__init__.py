"""Cryptography at the edges of a round: homomorphic aggregation (CKKS)."""
