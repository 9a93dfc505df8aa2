"""What travels between the coordinator and a site: every message key, and the one place
adapters, ciphertexts, spends and signatures become Flower records and back (both apps,
the stages and the mods use it; nothing else in `fedllm/` touches Flower records)."""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedllm.errors import InvalidUpdateError
from fedllm.privacy.accounting import MECHANISMS
from fedllm.quantize import decode_fp16, decode_int8, encode_fp16, encode_int8
from fedllm.secure.instruction import Instruction, instruction_fields
from fedllm.secure.registry import RegisteredSite
from fedllm.secure.sign import (
    INSTRUCTION_RECORD,
    SIGNATURE_RECORD,
    Claim,
    check_signature,
    content_digest,
    statement,
)

__all__ = [
    "ARRAYS",
    "CKKS_STYPE",
    "CONFIG",
    "ENCODING",
    "HE",
    "METRICS",
    "REFUSAL",
    "EVALUATE_FIGURES",
    "TRAIN_FIGURES",
    "arrays_to_record",
    "check_figures",
    "ciphertexts_to_record",
    "epsilon_key",
    "evaluate_metrics",
    "is_encrypted",
    "record_bytes",
    "record_to_arrays",
    "record_to_ciphertexts",
    "with_arrays",
    "refusal_content",
    "refusal_reason",
    "reply_site",
    "route_fedllm_logs",
    "content_digest",
    "decode_update",
    "decoded_reply",
    "encode_update",
    "instruction_record",
    "sign_instruction",
    "sign_reply",
    "site_spend_record",
    "with_spend_record",
    "spend_metrics",
    "train_metrics",
    "verify_reply",
]

# -- record names inside a message's RecordDict ------------------------------------------------
ARRAYS = "arrays"  # the adapter (ArrayRecord): plaintext tensors or CKKS ciphertexts
CONFIG = "config"  # coordinator -> site instructions (ConfigRecord)
METRICS = "metrics"  # site -> coordinator figures (MetricRecord)
REFUSAL = "refusal"  # a site's refusal: ConfigRecord {"reason": ...}
SPEND = "spend"  # a train reply's signed ledger record of its spend: ConfigRecord {"record"}
HE = "he"  # an encrypted reply's key id and payload digest: ConfigRecord
ENCODING = "encoding"  # an encoded update's declared layout: ConfigRecord (see encode_update)

# -- coordinator -> site config keys ------------------------------------------------------------
RUN_NAME = "run-name"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
HE_KEY_ID = "he-key-id"
HE_DIVISOR = "he-divisor"
HE_SITES = "he-sites"
HE_WEIGHT_UNIT = "he-weight-unit"

# -- site -> coordinator metric keys ------------------------------------------------------------
SITE = "site"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
TRAIN_EXAMPLES = "train-examples"  # evaluate replies: the site's training examples
HE_WEIGHT = "he-weight"
HE_SECONDS = "he-seconds"
SAFETY_DROPPED = "safety-dropped"
REASON = "reason"  # the refusal record's one field: why the site refused
HE_RECORD_KEY_ID = "key-id"  # HE record: the id of the key the ciphertexts are under
HE_RECORD_SHA256 = "sha256"  # HE record: `payload_digest` of the ciphertexts
# train replies (besides SITE, NUM_EXAMPLES and `epsilon_key(...)` for each accountant);
# evaluate replies add TRAIN_EXAMPLES
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TOTAL_STEPS = "total-steps"
EPSILON = "epsilon"
STEPS = "steps"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
MAX_GRAD_NORM = "max-grad-norm"
EVAL_LOSS = "eval-loss"
PERPLEXITY = "perplexity"
EVAL_TOKENS = "eval-tokens"


def epsilon_key(mechanism: str) -> str:
    """The train-reply metric with the site's ε under one accountant (`epsilon-prv`, ...)."""
    return f"epsilon-{mechanism}"


# Ciphertexts travel as opaque byte arrays in an ArrayRecord, so Flower streams them in
# chunks like any tensor (a ConfigRecord of bytes would travel as one message).
CKKS_STYPE = "tenseal.ckks_vector"


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((name, Array.from_numpy_ndarray(np.asarray(a))) for name, a in arrays.items())
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's tensors; one whose bytes are not one numpy array is `InvalidUpdateError`."""
    return OrderedDict((name, _tensor(name, arr)) for name, arr in record.items())


def _tensor(name: str, arr: Array) -> np.ndarray:
    # The bytes come from the other party, and `np.load` fails on bad ones in many ways
    # (EOFError on none, BadZipFile, ValueError, MemoryError on a header claiming a huge
    # shape), or loads an .npz archive of several arrays: each is one refusal naming it
    # (by its repr: the name is the sender's too).
    try:
        value = arr.numpy()
    except Exception as e:  # any failure of np.load on foreign bytes (see above)
        # its first sentence only: numpy's next one advises loading pickles, unsafe here
        why = " ".join(str(e).split(". ")[0].split())[:200]
        raise InvalidUpdateError(
            f"tensor {name!r} is not a readable numpy array ({type(e).__name__}: {why})."
        ) from e
    if not isinstance(value, np.ndarray):
        raise InvalidUpdateError(f"tensor {name!r} is an archive of arrays, not one array.")
    return value


def with_arrays(reply: Message, arrays: Mapping[str, np.ndarray]) -> Message:
    """`reply` with its update replaced by `arrays` (every other record and the metadata
    kept), for a stage that changes an update before the stages further in see it."""
    content = RecordDict({**reply.content, ARRAYS: arrays_to_record(arrays)})
    return Message(content=content, metadata=reply.metadata)


def ciphertexts_to_record(blobs: list[bytes]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict(
            (f"ckks-{i:05d}", Array(dtype="uint8", shape=(len(b),), stype=CKKS_STYPE, data=b))
            for i, b in enumerate(blobs)
        )
    )


def is_encrypted(record: ArrayRecord) -> bool:
    return any(arr.stype == CKKS_STYPE for arr in record.values())


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    """The serialized CKKS vectors in order; any plaintext tensor among them is refused."""
    names = list(record)
    if names != [f"ckks-{i:05d}" for i in range(len(names))]:
        raise InvalidUpdateError("encrypted record has missing or misnamed ciphertexts.")
    if any(arr.stype != CKKS_STYPE for arr in record.values()):
        raise InvalidUpdateError("encrypted record mixes plaintext tensors with ciphertexts.")
    return [bytes(arr.data) for arr in record.values()]


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors a record carries (what travels on the wire, minus framing)."""
    return int(sum(len(arr.data) for arr in record.values()))


# -- encoded updates (strategy.update-encoding) ----------------------------------------------
# An encoded train reply carries, under ARRAYS, the site's update: its trained adapter minus
# the global adapter this round's request carried (the coordinator holds that global, so it
# adds it back). Per tensor name N: fp16, N as float16 of N's shape; int8, N as int8 codes
# of N's shape and N + SCALES_SUFFIX as the float32 absmax of each block of `block` values
# (`fedllm.quantize`). The ENCODING record declares it: {"scheme", "base": "global"} and,
# for int8, "block". The update rather than the adapter is quantised: its error then scales
# with how far the round moved, not with the adapter's size (LoRA's A, sent without FFA, is
# a random initialisation far larger than one round's change to it).
SCALES_SUFFIX = "#absmax"  # '#' occurs in no parameter name: a scale cannot shadow a tensor
_BASE = "global"


def encode_update(
    content: RecordDict, reference: Mapping[str, np.ndarray], *, scheme: str, block: int
) -> None:
    """Replace the plaintext adapter under ARRAYS in `content` by its encoded update against
    `reference` (the global adapter the site was sent) and declare the layout (ENCODING).

    Raises
    ------
    InvalidUpdateError
        If a tensor is not in `reference`, or holds values the encoding cannot carry.
    """
    trained = record_to_arrays(content[ARRAYS])
    encoded: dict[str, np.ndarray] = OrderedDict()
    for name, value in trained.items():
        if name not in reference:
            raise InvalidUpdateError(f"tensor {name!r} is not in the global adapter received.")
        delta = np.asarray(value, dtype=np.float32) - np.asarray(reference[name], np.float32)
        if scheme == "fp16":
            encoded[name] = encode_fp16(delta, name=name)
        elif scheme == "int8":
            encoded[name], encoded[name + SCALES_SUFFIX] = encode_int8(
                delta, block=block, name=name
            )
        else:
            raise ValueError(f"unknown update encoding {scheme!r}.")
    fields: dict[str, Any] = {"scheme": scheme, "base": _BASE}
    if scheme == "int8":
        fields["block"] = block
    content[ARRAYS] = arrays_to_record(encoded)
    content[ENCODING] = ConfigRecord(fields)


def decode_update(
    content: RecordDict,
    reference: Mapping[str, np.ndarray],
    *,
    scheme: str,
    block: int,
) -> dict[str, np.ndarray] | None:
    """The float32 adapter an encoded train reply carries (`reference` + its update), or
    None for a plain reply in an fp32 run (left as it is). `reference` is the round's global
    adapter, name -> tensor: every tensor of it, and nothing else, must be in the update.

    Raises
    ------
    InvalidUpdateError
        Naming what is wrong: an encoding other than the run's (`scheme`, `block`), a
        tensor or scale missing, extra or unreadable, or of the wrong dtype, shape or values.
    """
    fields = content.config_records.get(ENCODING)
    if fields is None:
        if scheme == "fp32":
            return None
        raise InvalidUpdateError(
            f"sent an fp32 update; this run's strategy.update-encoding is {scheme!r}."
        )
    declared = fields.get("scheme")
    if scheme == "fp32":  # an fp32 run's replies carry no encoding record, "fp32" or other
        raise InvalidUpdateError(
            f"sent an update declared encoded {declared!r}; this run's "
            "strategy.update-encoding is 'fp32' (adapters as trained)."
        )
    if declared != scheme:
        raise InvalidUpdateError(
            f"sent an update encoded {declared!r}; this run's strategy.update-encoding is "
            f"{scheme!r}."
        )
    if fields.get("base") != _BASE:
        raise InvalidUpdateError(
            f"encoded update is relative to {fields.get('base')!r}, not 'global'."
        )
    if scheme == "int8" and (type(fields.get("block")) is not int or fields["block"] != block):
        raise InvalidUpdateError(
            f"int8 update in blocks of {fields.get('block')!r}; this run's "
            f"strategy.quantization-block is {block}."
        )
    record = content[ARRAYS]
    if is_encrypted(record):
        raise InvalidUpdateError("encoded update holds ciphertexts.")
    wanted = [*reference] + ([n + SCALES_SUFFIX for n in reference] if scheme == "int8" else [])
    for name in [*wanted, *sorted(set(record) - set(wanted))]:
        if (name in record) != (name in wanted):
            what = "lacks" if name in wanted else "carries unexpected"
            raise InvalidUpdateError(f"{scheme} update {what} array {name!r}.")
    out: dict[str, np.ndarray] = OrderedDict()
    for name, ref in reference.items():
        codes = _tensor(name, record[name])
        if codes.shape != ref.shape:
            raise InvalidUpdateError(
                f"tensor {name!r} has shape {codes.shape}, expected {tuple(ref.shape)}."
            )
        try:
            if scheme == "fp16":
                if codes.dtype != np.float16:
                    raise InvalidUpdateError(f"has dtype {codes.dtype}, expected float16.")
                if not np.all(np.isfinite(codes)):
                    raise InvalidUpdateError("holds NaN or infinite values.")
                delta = decode_fp16(codes)
            else:
                scales = _tensor(name + SCALES_SUFFIX, record[name + SCALES_SUFFIX])
                delta = decode_int8(codes, scales, block=block)
        except InvalidUpdateError as e:
            raise InvalidUpdateError(f"tensor {name!r}: {e}") from e
        with np.errstate(over="ignore"):  # an overflow is inf, which validation refuses
            out[name] = (np.asarray(ref, np.float64) + delta).astype(np.float32)
    return out


def decoded_reply(reply: Message, arrays: Mapping[str, np.ndarray]) -> Message:
    """`reply` carrying the decoded adapter `arrays`, without its ENCODING record (every
    other record and the metadata kept), as the stages further in expect a plain update."""
    content = RecordDict({k: v for k, v in reply.content.items() if k != ENCODING})
    content[ARRAYS] = arrays_to_record(arrays)
    return Message(content=content, metadata=reply.metadata)


def reply_site(content: RecordDict) -> int:
    """The partition id a reply claims to come from (checked by the signature stage)."""
    site = content[METRICS][SITE]
    if isinstance(site, bool) or not isinstance(site, int) or site < 0:
        raise InvalidUpdateError(f"metric '{SITE}' = {site!r} is not a partition id.")
    return site


# What the coordinator reads from a reply, and of what kind: "count" a non-negative int,
# "number" any real number but NaN (a non-DP site reports epsilon = inf), "finite" a finite
# one. The summary, the ledger and the aggregate read exactly these, so a reply lacking one,
# or carrying another kind of value, is rejected before anything reads it.
TRAIN_FIGURES = {
    SITE: "count",
    NUM_EXAMPLES: "count",
    TRAIN_LOSS: "finite",
    EPSILON: "number",
    DELTA: "number",
    NOISE_MULTIPLIER: "number",
}
EVALUATE_FIGURES = {
    SITE: "count",
    EVAL_LOSS: "finite",
    PERPLEXITY: "number",
    EVAL_TOKENS: "count",
}
# the round's DP-SGD spend (record-level), read into the run ledger by the coordinator
SPEND_FIGURES = {
    NOISE_MULTIPLIER: "finite",
    SAMPLE_RATE: "finite",
    STEPS: "count",
    MAX_GRAD_NORM: "finite",
    DELTA: "finite",
    **{epsilon_key(m): "finite" for m in MECHANISMS},
}
_HISTORY_FIGURES = {
    "spent-rounds": "count",
    "spent-sigma": "finite",
    "spent-q": "finite",
    "spent-steps": "count",
}


def _is(kind: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if kind == "count":
        return isinstance(value, int) and value >= 0
    return not math.isnan(value) and (kind == "number" or math.isfinite(value))


def check_figures(metrics: Mapping[str, Any], figures: Mapping[str, str], *, sender: str) -> None:
    """Raise `InvalidUpdateError` naming the first figure that is missing or not of its kind."""
    for key, kind in figures.items():
        if key not in metrics:
            raise InvalidUpdateError(f"{sender}: reply lacks the metric '{key}'.")
        if not _is(kind, metrics[key]):
            raise InvalidUpdateError(
                f"{sender}: metric '{key}' = {metrics[key]!r} is not a {kind} value."
            )


def spend_metrics(metrics: Mapping[str, Any], *, sender: str = "a site") -> dict[str, Any] | None:
    """A training reply's record-level DP-SGD spend as typed values for the run ledger, or
    None when the reply reports none (no record-level DP at that site). A spend that is not
    well formed (a figure missing, NaN, of the wrong kind, or a spend history whose lists
    differ in length) raises `InvalidUpdateError`: nothing of it may reach the ledger."""
    if epsilon_key("prv") not in metrics:
        return None
    check_figures(metrics, {SITE: "count", **SPEND_FIGURES}, sender=sender)
    history = [k for k in _HISTORY_FIGURES if k in metrics]
    if history:
        if len(history) != len(_HISTORY_FIGURES):
            raise InvalidUpdateError(f"{sender}: spend history lacks some of the spent-* lists.")
        lists = [metrics[k] for k in _HISTORY_FIGURES]
        if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
            raise InvalidUpdateError(
                f"{sender}: spend history lists spent-* differ in length or are not lists."
            )
        for key, kind in _HISTORY_FIGURES.items():
            if not all(_is(kind, v) for v in metrics[key]):
                raise InvalidUpdateError(f"{sender}: spend history '{key}' has a bad value.")
    return {
        "site": int(metrics[SITE]),
        "noise_multiplier": float(metrics[NOISE_MULTIPLIER]),
        "sample_rate": float(metrics[SAMPLE_RATE]),
        "steps": int(metrics[STEPS]),
        "max_grad_norm": float(metrics[MAX_GRAD_NORM]),
        "delta": float(metrics[DELTA]),
        "epsilons": {m: float(metrics[epsilon_key(m)]) for m in MECHANISMS},
    }


def sign_reply(content: RecordDict, key: ed25519.Ed25519PrivateKey, claim: Claim) -> RecordDict:
    """Attach a `signature` record to a reply (done last: nothing may change after)."""
    digest = content_digest(content)
    content[SIGNATURE_RECORD] = ConfigRecord(
        {
            "run-id": str(claim.run_id),  # uint64 node/run ids overflow a signed int field
            "round": claim.server_round,
            "node-id": str(claim.node_id),
            "phase": claim.phase,
            "sha256": digest,
            "ed25519": key.sign(statement(claim, digest)),
        }
    )
    return content


def sign_instruction(
    content: RecordDict,
    key: ed25519.Ed25519PrivateKey,
    ins: Instruction,
    registry: bytes,
) -> RecordDict:
    """A copy of an outgoing message's content with the coordinator's `instruction` record
    (`ins.content_sha256` is the digest of `content`, `content_digest`). A copy, because a
    Flower strategy hands every node's message the same RecordDict; the records inside it
    are shared, not copied."""
    signed = RecordDict(dict(content.items()))
    signed[INSTRUCTION_RECORD] = ConfigRecord(instruction_fields(ins, key, registry))
    return signed


def instruction_record(content: RecordDict) -> tuple[Mapping[str, Any] | None, str]:
    """A message's instruction record (None if unsigned) and the digest of its content."""
    fields = content.config_records.get(INSTRUCTION_RECORD)
    return (dict(fields) if fields is not None else None), content_digest(content)


def verify_reply(content: RecordDict, site: RegisteredSite, expected: Claim, *, sender: str) -> str:
    """Check a reply's signature against `site`'s registered key and `expected` (this run,
    this round, the node it came from). Returns the verified digest.

    Raises
    ------
    InvalidUpdateError
        Naming `sender` and why: unsigned, tampered, wrong key, or replayed.
    """
    if SIGNATURE_RECORD not in content.config_records:
        raise InvalidUpdateError(
            f"{sender}: unsigned update; security.sign-updates requires every site to sign "
            "with its key from `fedllm pki init`."
        )
    fields = content.config_records[SIGNATURE_RECORD]
    return check_signature(fields, content_digest(content), site, expected, sender=sender)


def with_spend_record(content: RecordDict, record: Mapping[str, Any]) -> RecordDict:
    """Carry the site's stored ledger record of this round's spend (signed by the site, as
    it wrote it) in its reply, for the run's ledger to hold as the site's own word."""
    content[SPEND] = ConfigRecord({"record": json.dumps(record, sort_keys=True)})
    return content


def site_spend_record(content: RecordDict, *, sender: str) -> dict[str, Any] | None:
    """The ledger record a train reply carries, or None; a malformed one is refused."""
    if SPEND not in content.config_records:
        return None
    try:
        record = json.loads(str(content.config_records[SPEND]["record"]))
    except (KeyError, ValueError) as e:
        raise InvalidUpdateError(f"{sender}: malformed spend record ({e}).") from e
    if not isinstance(record, dict):
        raise InvalidUpdateError(f"{sender}: malformed spend record (not an object).")
    return record


def route_fedllm_logs() -> None:
    """Show fedllm's INFO logs through Flower's handlers (`flwr log`, `--stream`, Ray actors)."""
    flwr_logger = logging.getLogger("flwr")
    ours = logging.getLogger("fedllm")
    ours.setLevel(logging.INFO)
    for handler in flwr_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


def train_metrics(
    out: Any, *, site: int, max_grad_norm: float, history: Mapping[str, Any]
) -> dict[str, Any]:
    """A training reply's metrics from the site's round (`out`, a `fedllm.site.SiteRound`):
    examples, loss, steps, ε (cumulative, and under each accountant) and the spend that
    `spend_metrics` reads back; `max_grad_norm` is 0.0 without record-level DP. `history`
    (`fedllm.privacy.backfill.history_metrics` of the site's ledger) lets the coordinator
    backfill spends whose replies it never accepted."""
    return {
        NUM_EXAMPLES: out.num_examples,
        SITE: site,
        TRAIN_LOSS: out.result.mean_loss,
        TRAIN_SECONDS: out.result.seconds,
        STEPS: out.result.steps,
        TOTAL_STEPS: out.total_steps,
        EPSILON: out.epsilon,
        DELTA: out.delta,
        NOISE_MULTIPLIER: out.noise_multiplier,
        SAMPLE_RATE: out.sample_rate,
        MAX_GRAD_NORM: max_grad_norm,
        **{epsilon_key(m): float(out.epsilons.get(m, float("inf"))) for m in MECHANISMS},
        **history,
    }


def refusal_content(site: int, reason: str) -> RecordDict:
    """A site's refusal of a training round (a reply, not an error): `refused` = 1, no
    examples, and why in the `refusal` record."""
    metrics = MetricRecord({SITE: site, REFUSED: 1, NUM_EXAMPLES: 0})
    return RecordDict({METRICS: metrics, REFUSAL: ConfigRecord({REASON: reason})})


def refusal_reason(content: RecordDict) -> str | None:
    """Why a site refused the request this reply answers, or None if it did not refuse."""
    if not content[METRICS].get(REFUSED):
        return None
    return str(content[REFUSAL][REASON])


def evaluate_metrics(res: Any, *, site: int, train_examples: int) -> dict[str, Any]:
    """An evaluation reply's metrics from the site's result (`res`, a `fedllm.train.EvalResult`);
    `train_examples` is the site's training set size, from which the coordinator derives
    the public weight unit of HE rounds."""
    return {
        NUM_EXAMPLES: res.num_examples,
        SITE: site,
        EVAL_LOSS: res.loss,
        PERPLEXITY: res.perplexity,
        EVAL_TOKENS: res.num_tokens,
        TRAIN_EXAMPLES: train_examples,
    }
