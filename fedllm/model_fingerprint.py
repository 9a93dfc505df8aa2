"""The fingerprint of a base model: SHA-256 over what decides what a site trains.

A site that runs offline on its own copy of the base model (node config `model`) trains
only when that copy is the model the run names (`model.fingerprint`); `fedllm model
fingerprint PATH_OR_NAME` prints the value. Two copies have the same fingerprint exactly
when they hold the same weights, the same weight-relevant config and the same tokenizer,
wherever they live and whenever their files were written.

What is fingerprinted, in one list of files sorted by relative path, all of them in the
directory itself (`from_pretrained` reads no sub-folder of it):

- `config.json`, as canonical JSON (sorted keys, compact) without `_IGNORED_KEYS`: the
  architecture, shapes and every setting that gives the weights their meaning;
- every weight file (`*.safetensors`, `*.bin`): all of them, not only those transformers
  would pick, so every site must hold the same set (copy the directory that was
  fingerprinted; a hub snapshot with both `.bin` and `.safetensors` differs from one with
  only the latter: a refusal, never a wrong model passing);
- the tokenizer (`_TOKENIZER_FILES`, and `additional_chat_templates/*`) where present: the
  vocabulary, merges, special tokens and chat template decide what a training example *is*
  (which ids a record becomes, which tokens are prompt and which answer), so a copy with
  the same weights and another tokenizer trains, and is evaluated, on other inputs;

and not `generation_config.json` (sampling defaults: fedllm's training and evaluation never
generate), `model.safetensors.index.json` (which shard holds which tensor: the shards
themselves are hashed), READMEs, licences, hidden files or sub-folders. Each file enters as
its length-prefixed relative path, its length and the SHA-256 of its content: raw bytes read
in 1 MiB chunks, but JSON files as canonical JSON (sorted keys, compact, so a re-save that
only re-indents changes nothing), and `config.json` and `tokenizer_config.json` without
`_IGNORED_KEYS`.

Hashing the embedded model's fp32 copy (538 MB of weights) took 0.63-0.70 s here (3 runs,
files in the page cache; reading them from disk first adds the disk's time), so a process
keeps each result per (directory, every file's size, mtime, ctime and inode): a site checks
its model every round at the cost of a few `stat` calls (0.3 ms).

Pure (files in, a hex string out) but for `run_model_fingerprint`, which resolves what a
run names as `fedllm.model` does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.errors import ModelError

if TYPE_CHECKING:
    from fedllm.config import ModelConfig

__all__ = ["FINGERPRINT_VERSION", "model_fingerprint", "run_model_fingerprint"]

FINGERPRINT_VERSION = b"fedllm-model-fingerprint/1\n"  # bump if what is hashed changes
_CHUNK = 1 << 20  # 1 MiB

# Keys of `_METADATA_JSON` that record where, when or by what a copy was saved, never what
# its weights or tokens mean. They differ between two copies of one model, so they are left
# out (at every depth):
# - `_name_or_path`, `name_or_path`, `_commit_hash` and every other `_`-prefixed key
#   (transformers' private bookkeeping, e.g. `_model_name_or_path`, `_attn_implementation`):
#   the path or hub revision it was loaded from;
# - `transformers_version`: the library that wrote the file;
# - `torch_dtype` / `dtype`: the dtype it was saved in. Each tensor's dtype is in the weight
#   files, which are hashed (a copy cast to bf16 has other bytes, so another fingerprint);
#   fedllm loads in `model.dtype`, never in the config's; and transformers 4 writes
#   `torch_dtype` where 5 writes `dtype`, so one model re-saved would otherwise change;
# - `is_local`, `local_files_only`, `cache_dir`: how the tokenizer was loaded (transformers
#   5 writes them into tokenizer_config.json).
# Everything else stays, even keys that change only inference (`use_cache`): a key left in
# can only make two copies differ, a key left out could let another model pass.
_IGNORED_KEYS = frozenset(
    {
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "is_local",
        "local_files_only",
        "cache_dir",
    }
)
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)
_METADATA_JSON = frozenset({"config.json", "tokenizer_config.json"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CHAT_TEMPLATES_DIR = "additional_chat_templates"

# (resolved directory, every hashed file's (path, size, mtime, ctime, inode)) -> fingerprint
_CACHE: dict[tuple[str, tuple[tuple[str, int, int, int, int], ...]], str] = {}
_CACHE_MAX = 16
_LOCK = threading.Lock()


def _drop_ignored(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _drop_ignored(v)
            for k, v in value.items()
            if k not in _IGNORED_KEYS and not str(k).startswith("_")
        }
    if isinstance(value, list):
        return [_drop_ignored(v) for v in value]
    return value


def _canonical_json(path: Path, *, drop: bool) -> bytes:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(
            f"{path} is not readable JSON ({e}); the model cannot be fingerprinted."
        ) from e
    if drop:  # only metadata files: a vocabulary's keys are tokens, and "_x" may be one
        data = _drop_ignored(data)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hashed(name: str) -> bool:
    if name.startswith("."):
        return False
    return name == "config.json" or name in _TOKENIZER_FILES or name.endswith(_WEIGHT_SUFFIXES)


def _files(root: Path) -> list[str]:
    """The relative paths (`/`-separated) of the files that are fingerprinted, sorted."""
    found = [p.name for p in root.iterdir() if p.is_file() and _hashed(p.name)]
    templates = root / _CHAT_TEMPLATES_DIR
    if templates.is_dir():
        found += [
            f"{_CHAT_TEMPLATES_DIR}/{p.name}"
            for p in templates.iterdir()
            if p.is_file() and not p.name.startswith(".")
        ]
    return sorted(found)


def _model_root(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist.")
    if not (root / "config.json").is_file():
        raise ModelError(
            f"model directory {root} has no config.json; give a directory saved with "
            "save_pretrained (`fedllm model prepare` prints the embedded model's)."
        )
    return root.resolve()


def _file_digest(path: Path) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.digest()


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _compute(root: Path, files: list[str]) -> str:
    outer = hashlib.sha256(FINGERPRINT_VERSION)
    weights = 0
    for rel in files:
        path = root / rel
        if rel.endswith(".json"):
            content = _canonical_json(path, drop=rel in _METADATA_JSON)
            size, digest = len(content), hashlib.sha256(content).digest()
        else:
            size, digest = _file_digest(path)
        weights += rel.endswith(_WEIGHT_SUFFIXES)
        outer.update(_length_prefixed(rel.encode()))
        outer.update(size.to_bytes(8, "big"))
        outer.update(digest)
    if not weights:
        raise ModelError(
            f"model directory {root} holds no weight file (*.safetensors, *.bin); "
            "the model cannot be fingerprinted."
        )
    return outer.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of the model directory `path`: config, weights and tokenizer (see the
    module docstring). Equal for every copy of one model, whatever its path and file times.

    Raises
    ------
    ModelError
        If `path` is not a directory with a config.json and at least one weight file, or a
        JSON file in it is not readable.
    """
    root = _model_root(path)
    files = _files(root)
    stats = []
    for rel in files:
        st = (root / rel).stat()
        stats.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    key = (str(root), tuple(stats))
    with _LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    fingerprint = _compute(root, files)
    with _LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = fingerprint
    return fingerprint


def run_model_fingerprint(cfg: ModelConfig) -> str | None:
    """`model_fingerprint` of the model a run names (`model.name`, `model.gguf-file`), in
    the directory a site loads it from (`fedllm.model.local_model_dir`: the embedded
    default's and a GGUF's safetensors copy under `$FEDLLM_CACHE`, converted once; a local
    directory itself; a hub id's snapshot in the Hugging Face cache), or None for a hub id
    that is not cached (nothing is downloaded)."""
    # heavy: fedllm.model imports torch (~5 s); fingerprinting a directory needs none of it
    from fedllm.model import local_model_dir

    directory = local_model_dir(cfg)
    return None if directory is None else model_fingerprint(directory)
