"""Save a trained model (full weights, a peft adapter, or the adapter merged in) with its
tokenizer and chat template, atomically, as safetensors only.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from torch import nn

# Files a model/adapter/tokenizer save writes. When out_dir already exists, these are replaced
# by the new save; anything else there (metrics.jsonl, checkpoints/, report.html, config.yaml)
# is carried over into the new directory, so saving into a run's output_dir loses nothing.
_MODEL_ARTEFACTS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_config.json",
    "adapter_model.*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "additional_chat_templates",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "README.md",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP/accelerate (``.module``), torch.compile (``._orig_mod``) and posttrain's
    LogProbModel (``.model``) wrappers, returning the HF or peft model inside."""
    from posttrain.models.logprobs import LogProbModel

    while True:
        if isinstance(model, LogProbModel):
            model = model.model
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        ) or (
            hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config")
        ):
            model = model.module
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _is_artefact(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pat) for pat in _MODEL_ARTEFACTS)


def save_pretrained_model(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    merge_adapter: bool = False,
    safe: bool = True,
    state_dict: dict | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``, with its chat template — pitfall 5) to ``out_dir``.

    A peft model is saved as its adapter (adapter_config.json + adapter_model.safetensors),
    or with ``merge_adapter=True`` as full weights with the adapter folded in (computed on a copy:
    the live model is left untouched, unmerged). Written into a temporary sibling directory and
    swapped in with renames, so a crash never leaves a half-written ``out_dir``; non-model files
    already in ``out_dir`` are kept. Returns ``out_dir``. Only safetensors are ever written.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's gathered
    :func:`full_state_dict`).
    """
    if not safe:
        raise ValueError("posttrain writes safetensors only (pickle checkpoints can run code on load)")
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_pretrained_files(model, tokenizer, tmp, merge_adapter=merge_adapter, state_dict=state_dict)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def full_state_dict(model: nn.Module) -> dict | None:
    """The whole weights of a model sharded by FSDP2 (DTensor parameters), gathered onto the main
    process's CPU (other processes get {}); None for an unsharded model, which saves itself.
    Collective: EVERY process must call it, in the same order (pitfall 28). A shard's own
    state_dict() would write rank 0's slice of every matrix."""
    model = unwrap_model(model)
    if not any(hasattr(p, "full_tensor") for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied parameter (lm_head = embeddings) comes back as two gathered copies: make them one
    # tensor again, so save_pretrained drops the tied name as it does for an unsharded model
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name and kept in state and name in state:
            state[name] = state[kept]
    return state


def write_pretrained_files(model: nn.Module, tokenizer, directory: Path, *, merge_adapter: bool = False,
                           state_dict: dict | None = None) -> None:
    """The files of :func:`save_pretrained_model`, written straight into ``directory`` (no
    swap): for a caller that makes the whole directory atomic itself, e.g. a checkpoint.
    ``state_dict``: as in :func:`save_pretrained_model`."""
    model = unwrap_model(model)
    weights = {} if state_dict is None else {"state_dict": state_dict}
    if weights and _is_peft(model) and merge_adapter:
        raise NotImplementedError("merge_adapter of an FSDP2-sharded model: save the adapter, then merge it "
                                  "unsharded (PeftModel.from_pretrained(base, dir).merge_and_unload())")
    config = getattr(model, "config", None)
    training_use_cache = getattr(config, "use_cache", None)
    if config is not None and training_use_cache is False:
        config.use_cache = True  # off only for gradient checkpointing; inference wants it
    try:
        if _is_peft(model) and merge_adapter:
            merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(directory)
            del merged
        elif _is_peft(model):
            # the trained (active) adapter only: never the frozen reference copy beside it
            model.save_pretrained(directory, selected_adapters=[model.active_adapter], **weights)
        else:
            model.save_pretrained(directory, **weights)
    finally:
        if config is not None and training_use_cache is not None:
            config.use_cache = training_use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` with ``tmp`` by renames, carrying over out's non-model entries."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    for entry in out.iterdir():
        if not _is_artefact(entry.name) and not (tmp / entry.name).exists():
            os.replace(entry, tmp / entry.name)  # same filesystem: a rename, even for checkpoints/
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
