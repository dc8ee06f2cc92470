"""From a config to a trainable model and its tokenizer — what every recipe does first."""

from __future__ import annotations

from collections.abc import Callable

from posttrain.models.dropout import disable_dropout
from posttrain.models.loading import (
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    model_load_kwargs,
    upcast_trainable_parameters,
)
from posttrain.models.lora import apply_lora, is_peft_model

ADAPTER_START_MODES = ("continue", "merge")


def resolve_tokenizer(config, tokenizer=None):
    """The given tokenizer, else --tokenizer_name_or_path, else the model's own."""
    if tokenizer is not None:
        return tokenizer
    return load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path,
                          revision=config.model_revision, trust_remote_code=config.trust_remote_code)


def _record_merged_start(model, start: str | None, log) -> None:
    """With --adapter_start merge the new adapter applies on top of base + the start adapter, so its
    saved adapter_config names the START ADAPTER as its base: load_causal_lm loads such a base as
    base + that adapter merged, so the saved stage loads and chains again (chains of any length)."""
    from pathlib import Path

    if start is None:
        log("warning: the saved adapter applies on top of the merged model that was passed in; its "
            "adapter_config names the original base (pass --model_name_or_path to record the start)")
        return
    path = Path(start).expanduser()
    model.peft_config[model.active_adapter].base_model_name_or_path = str(path.resolve()) if path.exists() else start


def prepare_model_for_training(config, model=None, log: Callable[[str], None] = print):
    """Load (unless given), enable gradient checkpointing, start from an adapter per
    --adapter_start or wrap in a fresh LoRA when asked, dropout off (--disable_dropout), train mode."""
    adapter_start = getattr(config, "adapter_start", "continue")
    if adapter_start not in ADAPTER_START_MODES:
        from posttrain.config import ConfigError

        raise ConfigError(f"adapter_start: {adapter_start!r} is not one of {', '.join(ADAPTER_START_MODES)}")
    if model is None:
        model = load_causal_lm(config.model_name_or_path, **model_load_kwargs(config, config.model_name_or_path),
                               gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    from_adapter = is_peft_model(model)
    if from_adapter:  # a LoRA stage started from a trained adapter (pitfall 24)
        if adapter_start == "merge":
            model = model.merge_and_unload()
            log("start: the adapter is merged into its base; "
                + ("a new LoRA adapter is trained on the merged weights" if config.use_peft
                   else "all merged weights are trained (no --use_peft)"))
        else:
            log("start: continuing to train the given adapter (its own r, alpha, dropout and target modules; "
                "--lora_* flags do not apply; --adapter_start merge folds it in and trains a new one)")
    if config.use_peft and not is_peft_model(model):
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules,
                           gradient_checkpointing=config.gradient_checkpointing)
        if from_adapter:
            _record_merged_start(model, config.model_name_or_path, log)
    if getattr(config, "disable_dropout", True):
        n = disable_dropout(model)
        if n:
            log(f"dropout: {n} dropout probabilities set to 0 (--disable_dropout; --disable_dropout false keeps them)")
    if not getattr(config, "low_precision_master_weights", False):
        upcast_trainable_parameters(model, log)  # pitfall 23: fp32 master weights
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {type(model).__name__}, dtype {next(model.parameters()).dtype}, {trainable:,} trainable parameters")
    return model
