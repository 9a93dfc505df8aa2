"""What a site does to its reply before it leaves, as Flower client mods (F8 in STYLE.md).

A mod wraps the ClientApp's handler: `mod(msg, context, call_next)`. Flower applies the
ClientApp's mods (`ClientApp(mods=...)`) outside a function's own (`@app.train(mods=...)`),
first in the list outermost, so a site's train reply passes, from the handler out:

    handler -> DistributedDPMod -> EncodeMod -> HEMod -> PolicyMod -> InstructionMod ->
    SignMod -> the coordinator

- `InstructionMod` checks the coordinator's signature on the request (its run, round,
  node, phase, content, run config and registry) before anything else reads it;
- `PolicyMod` checks the request against the site's own policy first (`fedllm.site_policy`)
  and answers one it does not accept with a refusal naming the rule: no data is read;
- `DistributedDPMod` (train only) clips the plaintext update and adds the noise share;
- `EncodeMod` (train only) sends the update as float16 or blockwise int8
  (`strategy.update-encoding`), after every privacy mechanism (post-processing) and before
  the signature (which covers the encoded bytes); refused with HE in the config;
- `HEMod` decrypts the global on the way in and encrypts the adapter on the way out;
- `SignMod` loads the key first of all (a bad key stops the site before it trains) and
  signs last (nothing may change a signed reply).

Values pass in the message, never in globals: `HEMod` puts the decrypted global in the
message's `arrays` record before calling in; the handler replies with its plaintext
`arrays` and `metrics` (`num-examples` sets the HE weight); `DistributedDPMod` reports its
seconds in `he-seconds`, which `HEMod` adds to. Each mod reads the config from the Context
with the same test `overrides` as the app (`fedllm.mods.context.site_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.clientapp.typing import Mod

from fedllm.mods.distributed_dp import DistributedDPMod
from fedllm.mods.encode import EncodeMod
from fedllm.mods.he import HEMod
from fedllm.mods.instruction import InstructionMod
from fedllm.mods.policy import PolicyMod
from fedllm.mods.sign import SignMod

__all__ = [
    "DistributedDPMod",
    "EncodeMod",
    "HEMod",
    "InstructionMod",
    "PolicyMod",
    "SignMod",
    "reply_mods",
    "train_mods",
]


def reply_mods(overrides: Mapping[str, Any] | None = None) -> list[Mod]:
    """The mods around every handler (`ClientApp(mods=...)`), outermost first."""
    return [SignMod(overrides), InstructionMod(overrides), PolicyMod(overrides), HEMod(overrides)]


def train_mods(overrides: Mapping[str, Any] | None = None) -> list[Mod]:
    """The mods around the train handler only (`@app.train(mods=...)`), inside `reply_mods`:
    the update is encoded after the distributed-DP noise share is added."""
    return [EncodeMod(overrides), DistributedDPMod(overrides)]
