"""The frozen reference policy of KL-regularised methods (DPO, KTO, PPO, GRPO, RLOO, Online DPO), in
four modes:

- ``separate``: its own copy of the weights (``--ref_model_name_or_path``, default the starting model);
- ``adapter_disabled``: a fresh LoRA (its B matrices exactly 0), the policy itself with its adapter
  switched off — no second copy;
- ``reference_adapter``: the policy started from a trained adapter (a chained LoRA stage,
  pitfall 24): a frozen copy of that adapter beside the trained one on the same base, activated
  for scoring — the starting policy, not the bare base, at the cost of one adapter;
- ``cached``: per-example log-probs computed once before training by one of the above and stored on
  disk (keyed by a hash of the reference weights, the tokenised data and the settings), so the
  reference never sits in memory during training and later runs on the same data reuse the file.

At step 0 the policy equals the reference in every mode, so DPO's loss is ln 2 and every implicit
reward is 0 (pitfall 10, tested for each mode). The reference is always scored in eval mode (no
dropout, pitfall 25), and the policy's modes and adapter are given back afterwards.
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
from posttrain.models.dropout import disable_dropout, eval_mode
from posttrain.models.logprobs import LogProbModel
from posttrain.models.lora import (
    REFERENCE_ADAPTER,
    adapter_active,
    adapter_is_identity,
    add_reference_adapter,
    is_peft_model,
)


class ReferencePolicy:
    """Token log-probs under the reference, with no gradient. ``mode`` is one of
    ``separate`` / ``adapter_disabled`` / ``reference_adapter``."""

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
            with eval_mode(self.scorer):
                return self.scorer(input_ids, **kwargs)["logps"]
        peft_model = policy_scorer.model
        if self.mode == "adapter_disabled":
            switch = peft_model.disable_adapter()
        elif self.mode == "reference_adapter":
            switch = adapter_active(peft_model, REFERENCE_ADAPTER)
        else:
            raise ValueError(f"unknown reference mode {self.mode!r}")
        with eval_mode(policy_scorer), switch:  # no dropout in the reference (pitfall 25)
            return policy_scorer(input_ids, **kwargs)["logps"]


def build_reference(policy_model: nn.Module, *, ref_model_name_or_path: str | None,
                    load: Callable[[str], nn.Module], chunk_size: int, device,
                    log: Callable[[str], None] = print) -> ReferencePolicy:
    """Pick the reference mode: a named reference model is always separate weights; otherwise a
    LoRA policy is its own reference — with a fresh adapter, its adapter-disabled self; started from
    a trained adapter, a frozen copy of that adapter on the same base (pitfall 24); otherwise a
    frozen copy of the starting policy. Call it before the first update."""
    if ref_model_name_or_path is None and is_peft_model(policy_model):
        if adapter_is_identity(policy_model):
            log("reference: the policy with its LoRA adapter disabled (no second copy in memory)")
            return ReferencePolicy("adapter_disabled")
        add_reference_adapter(policy_model)
        log(f"reference: the starting adapter, frozen as a second adapter {REFERENCE_ADAPTER!r} on the same base "
            "(the policy you started from; no second copy of the base)")
        return ReferencePolicy("reference_adapter")
    if ref_model_name_or_path is not None:
        ref = load(ref_model_name_or_path)
        log(f"reference: separate weights from {ref_model_name_or_path}")
    else:
        ref = copy.deepcopy(policy_model)  # the starting weights, before any update
        log("reference: separate frozen copy of the starting policy")
    ref.eval()
    ref.requires_grad_(False)
    disable_dropout(ref)  # eval mode already; also if a caller puts it in train mode
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
