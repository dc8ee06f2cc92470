"""LoRA adapters through peft."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def apply_lora(
    model,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str | None = None,
    gradient_checkpointing: bool = False,
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` in a peft LoRA model; only the adapters are trainable.

    task_type: "CAUSAL_LM" (policies) or "SEQ_CLS" (reward models: peft then also trains and
    saves the score head, ``modules_to_save``, and never puts LoRA on it).

    target_modules None -> "all-linear" (every linear layer except the output head).
    With gradient checkpointing the embeddings' output must require grad, else the checkpointed
    blocks see only frozen inputs and the adapters get no gradient (pitfall 21). Checkpointing
    is switched on here too if the model does not have it yet.
    """
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if on is None:
            on = getattr(model, "is_gradient_checkpointing", False)
        if not on:
            from posttrain.models.loading import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        model.enable_input_require_grads()
    config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if target_modules is not None else "all-linear",
    )
    return get_peft_model(model, config)


# The name of the frozen copy of a starting adapter that serves as the reference (pitfall 24);
# the trained adapter keeps peft's name for the active one ("default" when loaded from a dir).
REFERENCE_ADAPTER = "reference"


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "set_adapter") and hasattr(model, "disable_adapter")


def adapter_is_identity(model) -> bool:
    """True when the active LoRA adapter changes nothing (every B matrix exactly 0, as a fresh
    LoRA): then the policy with the adapter disabled IS the starting policy, bit for bit, since
    the adapter's output B·A·x·s is exactly 0. False for any other adapter (a trained one, DoRA,
    PiSSA-style inits that move the base, non-LoRA methods)."""
    name = model.active_adapter
    config = model.peft_config[name]
    if getattr(config, "peft_type", None) is None or str(config.peft_type.value) != "LORA" \
            or getattr(config, "use_dora", False):
        return False
    b_weights = [p for n, p in model.named_parameters()
                 if f"lora_B.{name}." in n or f"lora_embedding_B.{name}" in n]
    return bool(b_weights) and all(not p.detach().any() for p in b_weights)


def add_reference_adapter(model) -> str:
    """Copy the active adapter into a frozen second adapter ``REFERENCE_ADAPTER`` on the same base
    (no second copy of the base in memory); the active adapter and every requires_grad flag stay
    as they were. Values, dtype and device are copied exactly, so at step 0 the reference scores
    exactly what the policy scores."""
    import copy

    name = model.active_adapter
    if REFERENCE_ADAPTER in model.peft_config:
        raise ValueError(f"the model already has an adapter named {REFERENCE_ADAPTER!r}")
    flags = {p: p.requires_grad for p in model.parameters()}
    ref_config = copy.deepcopy(model.peft_config[name])
    ref_config.inference_mode = True
    if hasattr(ref_config, "lora_dropout"):
        ref_config.lora_dropout = 0.0  # only ever scored in eval mode; no dropout module at all
    model.add_adapter(REFERENCE_ADAPTER, ref_config)
    params = dict(model.named_parameters())
    copied = 0
    for param_name, param in params.items():
        parts = param_name.split(".")
        if REFERENCE_ADAPTER not in parts:
            continue
        source = params[".".join(name if part == REFERENCE_ADAPTER else part for part in parts)]
        if source.shape != param.shape:
            raise ValueError(f"reference adapter: {param_name} has shape {tuple(param.shape)}, its source "
                             f"{tuple(source.shape)}")
        param.data = source.detach().clone()  # same dtype and device as the trained adapter
        param.requires_grad_(False)
        copied += 1
    if not copied:
        raise ValueError(f"adapter {name!r}: no parameters found to copy into the reference adapter")
    model.set_adapter(name)
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return REFERENCE_ADAPTER


@contextmanager
def adapter_active(model, adapter_name: str) -> Iterator[None]:
    """Run the block with ``adapter_name`` as the active adapter, then switch back. peft's
    ``set_adapter`` also marks the adapter it activates as trainable, so every requires_grad flag
    is restored exactly (the frozen reference never joins the optimizer)."""
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)
