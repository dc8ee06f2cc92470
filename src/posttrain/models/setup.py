"""From a config to a trainable model and its tokenizer — what every recipe does first."""

from __future__ import annotations

from collections.abc import Callable

from posttrain.models.loading import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from posttrain.models.lora import apply_lora


def resolve_tokenizer(config, tokenizer=None):
    """The given tokenizer, else --tokenizer_name_or_path, else the model's own."""
    if tokenizer is not None:
        return tokenizer
    return load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path,
                          revision=config.model_revision, trust_remote_code=config.trust_remote_code)


def prepare_model_for_training(config, model=None, log: Callable[[str], None] = print):
    """Load (unless given), enable gradient checkpointing, wrap in LoRA when asked, train mode."""
    if model is None:
        model = load_causal_lm(config.model_name_or_path, dtype=config.dtype,
                               attn_implementation=config.attn_implementation, revision=config.model_revision,
                               trust_remote_code=config.trust_remote_code,
                               gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.use_peft:
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules,
                           gradient_checkpointing=config.gradient_checkpointing)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {type(model).__name__}, dtype {next(model.parameters()).dtype}, {trainable:,} trainable parameters")
    return model
