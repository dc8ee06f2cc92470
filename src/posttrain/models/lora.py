"""LoRA adapters through peft."""

from __future__ import annotations


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
