"""AdamW with decoupled weight decay (none on biases and norms) and a warmup + decay schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D tensors are biases and norm scales: decaying them only hurts.
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel over all tensors (4x faster on CPU than the per-tensor loop); it needs every
    # parameter on one device type with a floating dtype, which holds for the models we train.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = len(devices) == 1 and devices.pop() in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else int(math.ceil(total_steps * warmup_ratio))


def build_scheduler(optimizer: torch.optim.Optimizer, *, name: str, total_steps: int, warmup_steps: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
