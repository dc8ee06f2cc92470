"""The frozen reference policy of KL-regularised methods (DPO, KTO, and later PPO/GRPO), in three modes:

- ``separate``: its own copy of the weights (``--ref_model_name_or_path``, default the starting model);
- ``adapter_disabled``: with LoRA, the policy itself with its adapter switched off — no second copy;
- ``cached``: per-example log-probs computed once before training by one of the above and stored on
  disk (keyed by a hash of the reference weights, the tokenised data and the settings), so the
  reference never sits in memory during training and later runs on the same data reuse the file.

At step 0 the policy equals the reference in every mode, so DPO's loss is ln 2 and every implicit
reward is 0 (pitfall 10, tested for each mode).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from posttrain.models.default_model import cache_root
from posttrain.models.logprobs import LogProbModel


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferencePolicy:
    """Token log-probs under the reference, with no gradient. ``mode`` is one of
    ``separate`` / ``adapter_disabled``."""

    def __init__(self, mode: str, scorer: LogProbModel | None = None) -> None:
        self.mode = mode
        self.scorer = scorer  # only for "separate"

    @torch.no_grad()
    def token_logps(self, policy_scorer: LogProbModel, input_ids, attention_mask=None, position_ids=None,
                    target_mask=None, temperature: float = 1.0, prefix=None) -> torch.Tensor:
        """(B, T-1) fp32 reference log-probs — (B, T) with a shared `prefix` (see
        LogProbModel.forward); `policy_scorer` is the unwrapped (not DDP) policy."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids, "target_mask": target_mask,
                  "temperature": temperature}
        if prefix is not None:
            kwargs["prefix"] = prefix
        if self.mode == "separate":
            return self.scorer(input_ids, **kwargs)["logps"]
        was_training = policy_scorer.training
        policy_scorer.eval()  # no dropout in the reference
        try:
            with policy_scorer.model.disable_adapter():
                return policy_scorer(input_ids, **kwargs)["logps"]
        finally:
            policy_scorer.train(was_training)


def build_reference(policy_model: nn.Module, *, ref_model_name_or_path: str | None,
                    load: Callable[[str], nn.Module], chunk_size: int, device,
                    log: Callable[[str], None] = print) -> ReferencePolicy:
    """Pick the reference mode: a named reference model is always separate weights; otherwise a
    LoRA policy uses its adapter-disabled self; otherwise a frozen copy of the starting policy."""
    if ref_model_name_or_path is None and _is_peft(policy_model):
        log("reference: the policy with its LoRA adapter disabled (no second copy in memory)")
        return ReferencePolicy("adapter_disabled")
    if ref_model_name_or_path is not None:
        ref = load(ref_model_name_or_path)
        log(f"reference: separate weights from {ref_model_name_or_path}")
    else:
        ref = copy.deepcopy(policy_model)  # the starting weights, before any update
        log("reference: separate frozen copy of the starting policy")
    ref.eval()
    ref.requires_grad_(False)
    return ReferencePolicy("separate", LogProbModel(ref.to(device), chunk_size=chunk_size))


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): identifies the reference
    weights exactly, whatever directory they were loaded from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def reference_cache_path(fingerprint: str, data_fingerprint: str, settings: dict) -> Path:
    key = hashlib.sha256(json.dumps({"w": fingerprint, "d": data_fingerprint, "s": settings},
                                    sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "ref_logps" / f"{key}.safetensors"


def data_fingerprint(sequences: Iterable[list[int]]) -> str:
    h = hashlib.sha256()
    for ids in sequences:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    return load_file(path) if path.exists() else None


def save_cached(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic: written beside and renamed, so a killed run never leaves a truncated cache."""
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
