"""The accelerate side of a run: devices, mixed precision, processes, trackers, seeding."""

from __future__ import annotations

import torch


def resolve_bf16(bf16: bool | None) -> bool:
    """bf16 mixed precision defaults to on only where the hardware has fast bf16 (CUDA)."""
    if bf16 is not None:
        return bf16
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def build_accelerator(*, bf16: bool | None, fp16: bool, report_to: list[str], output_dir: str, seed: int):
    """One Accelerator per run. Gradient accumulation is done by the recipe (with a loss normaliser
    over the whole optimizer step), so accelerate's own accumulation stays at 1."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if fp16 and resolve_bf16(bf16):
        raise ValueError("choose one of --bf16 and --fp16")
    mixed = "bf16" if resolve_bf16(bf16) else ("fp16" if fp16 else "no")
    trackers = [t for t in report_to if t != "none"]
    accelerator = Accelerator(
        mixed_precision=mixed,
        log_with=trackers or None,
        project_dir=output_dir,
        gradient_accumulation_steps=1,
        # Our step count is already global: accelerate would otherwise advance the LR schedule
        # once per process on each optimizer step.
        step_scheduler_with_optimizer=False,
    )
    set_seed(seed)
    return accelerator


def describe_device(accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{torch.get_num_threads()} CPU threads"
    return (f"device: {device} ({name}), processes: {accelerator.num_processes}, "
            f"mixed precision: {accelerator.mixed_precision}")


def start_run(config):
    """Accelerator + what the user sees first: the resolved config (also saved as config.yaml) and
    the device line. Every recipe starts here."""
    from posttrain.config import validate_training_config
    from posttrain.engine.console import format_config, save_resolved_config

    validate_training_config(config)
    accelerator = build_accelerator(bf16=config.bf16, fp16=config.fp16, report_to=config.report_to,
                                    output_dir=str(config.output_dir), seed=config.seed)
    accelerator.print(format_config(config))
    if accelerator.is_main_process:
        save_resolved_config(config, config.output_dir)
    accelerator.print(describe_device(accelerator))
    return accelerator
