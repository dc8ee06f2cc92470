"""Load tokenizers and causal LMs from a hub id, a local directory, a GGUF file or the default.

Weights are only ever read from safetensors: a pickle checkpoint (pytorch_model.bin) can run
arbitrary code on load, so it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from posttrain.models.default_model import cache_root, convert_gguf_to_hf_dir, default_model_dir

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    # for tests that check an exact identity without fp32 rounding noise
    "float64": torch.float64,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``auto`` -> fp32 (master weights: the precision policy, engine/precision.py, turns on
    autocast where bf16 is fast); or float32|bfloat16|float16."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, float32, bfloat16, float16")
    return _DTYPES[key]


def weights_dtype(config) -> str:
    """The dtype every model of a run is loaded in (pitfall 23: trained weights stay fp32).

    Training: fp32, except --low_precision_master_weights (pure --dtype bfloat16) and --use_peft with
    --dtype bfloat16/float16 (the frozen base in that dtype; trainable parameters are upcast to fp32
    by :func:`upcast_trainable_parameters`). Evaluation (a config without the flag): --dtype as
    given, auto = bf16 on a bf16 GPU, else fp32 (nothing is trained)."""
    if resolve_dtype(config.dtype) == torch.float64:
        return "float64"  # exactness tests: every model in double precision, no autocast
    low = resolve_dtype(config.dtype) != torch.float32
    if not hasattr(config, "low_precision_master_weights"):
        if str(config.dtype).lower() == "auto":
            return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
        return str(config.dtype)
    if low and (config.low_precision_master_weights or getattr(config, "use_peft", False)):
        return str(config.dtype)
    return "float32"


def model_load_kwargs(config, source: str | None = None) -> dict:
    """dtype, attn_implementation and trust_remote_code from the run's config, for EVERY model it
    loads (policy, reference, reward, value, eval baseline): equal load settings are what make
    policy == reference give KL 0 and DPO ln 2 exactly. --model_revision applies only to the
    policy's own source (another repo has other revisions)."""
    kwargs = {"dtype": weights_dtype(config), "attn_implementation": config.attn_implementation,
              "trust_remote_code": config.trust_remote_code}
    if source == config.model_name_or_path and getattr(config, "model_revision", None) is not None:
        kwargs["revision"] = config.model_revision
    return kwargs


def upcast_trainable_parameters(model, log=print) -> None:
    """fp32 master weights for every trainable parameter (a bf16 model passed from Python, a LoRA
    adapter or score head on a bf16 base); frozen ones keep their dtype."""
    # fp64 stays fp64 (exactness tests run in double precision)
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
    for p in low:
        p.data = p.data.float()
    if low:
        log(f"precision: {len(low)} trainable tensors upcast to fp32 master weights "
            "(--low_precision_master_weights true keeps them in bf16)")


def _gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory for a converted GGUF, keyed by its resolved path, size and mtime (hashing
    the content of a multi-GB file on every load would cost more than the load itself)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _resolve_source(name_or_path: str | None) -> str:
    """Map None / a .gguf file to a converted local directory; anything else is returned as is."""
    if name_or_path is None:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:  # the embedded default is already converted under its own name
            from posttrain.models.default_model import default_gguf_path

            if path.resolve() == default_gguf_path().resolve():
                return str(default_model_dir())
        except RuntimeError:
            pass
        out = _gguf_cache_dir(path)
        if not (out / "config.json").exists():
            convert_gguf_to_hf_dir(path, out)
        return str(out)
    return str(path) if path.exists() else str(name_or_path)


def _check_safetensors_dir(path: Path) -> None:
    if not (path / "config.json").exists():
        return  # an adapter directory, checked by its own loader
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); posttrain loads safetensors only "
            "because unpickling can run arbitrary code. Convert once in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes model.safetensors"
        )
    raise ValueError(f"{path} has a config.json but no *.safetensors weights")


def load_tokenizer(
    name_or_path: str | None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Tokenizer for a hub id, a local dir, a .gguf file (via the cached conversion) or the default.

    If the tokenizer has no pad token, pad = eos. That is safe because posttrain never derives
    labels or loss masks from pad ids (pitfall 1): they come from explicit masks.
    """
    from transformers import AutoTokenizer

    source = _resolve_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {source} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def enable_gradient_checkpointing(model) -> None:
    # non-reentrant: works with frozen inputs (LoRA) and with DDP without extra flags
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # a KV cache is useless in training and conflicts with checkpointing
    model.config.use_cache = False


def load_causal_lm(
    name_or_path: str | None,
    *,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
):
    """A causal LM from a hub id, a local dir, a .gguf file (converted once and cached) or the
    embedded default (``None``). Safetensors only. A directory holding a peft adapter
    (adapter_config.json, no config.json) loads its base model with the adapter attached.
    """
    from transformers import AutoModelForCausalLM

    source = _resolve_source(name_or_path)
    path = Path(source)
    torch_dtype = resolve_dtype(dtype)
    if path.is_dir():
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            return _load_adapter_dir(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                gradient_checkpointing=gradient_checkpointing,
            )
        _check_safetensors_dir(path)
    kwargs = {
        "dtype": torch_dtype,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _load_adapter_dir(path: Path, *, dtype, attn_implementation, trust_remote_code, gradient_checkpointing):
    from peft import PeftModel

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"adapter {path} does not name its base model (base_model_name_or_path)")
    base = load_causal_lm(
        base_name,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        gradient_checkpointing=gradient_checkpointing,
    )
    if hasattr(base, "peft_config"):
        # the base is itself an adapter dir: this adapter was trained on top of that one merged
        # (--adapter_start merge), so merge it first, then attach this one
        base = base.merge_and_unload()
    if gradient_checkpointing:
        base.enable_input_require_grads()  # pitfall 21
    return PeftModel.from_pretrained(base, str(path), is_trainable=True)
