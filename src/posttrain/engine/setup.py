"""The accelerate side of a run: devices, mixed precision, processes, trackers, seeding."""

from __future__ import annotations

import torch


def build_accelerator(*, mixed_precision: str, report_to: list[str], output_dir: str, seed: int):
    """One Accelerator per run; `mixed_precision` ("no" | "bf16" | "fp16") comes from
    engine/precision.resolve_precision. Gradient accumulation is done by the recipe (with a loss
    normaliser over the whole optimizer step), so accelerate's own accumulation stays at 1."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        # a second run in this process (notebook, tests) in another precision: accelerate's state is
        # a per-process singleton that refuses the change; the process group (PartialState) is kept
        AcceleratorState._reset_state()
    trackers = [t for t in report_to if t != "none"]
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
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


CPU_LAUNCH_LINE = ("ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m posttrain.cli <command> ... "
                   "(or: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m posttrain.cli ...)")


def _launched_world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def prepare_multi_process_launch() -> int:
    """Before the Accelerator exists: the number of processes the launcher started (WORLD_SIZE).

    On a machine without a GPU, torchrun (or `accelerate launch --multi_gpu`) starts N processes,
    but accelerate joins them only when ACCELERATE_USE_CPU is set; otherwise each rank trains
    alone, all writing one output dir. So with WORLD_SIZE > 1 and no accelerator, this turns on
    ACCELERATE_USE_CPU (gloo): the launch the user asked for becomes a real N-process run."""
    import os

    world = _launched_world_size()
    has_device = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if world > 1 and not has_device and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return world


def check_multi_process_launch(accelerator, launched: int) -> None:
    """After: refuse a run whose processes do not know each other (WORLD_SIZE != accelerate's
    process count) — they would each train on the full batch and overwrite one output dir."""
    from posttrain.errors import LaunchError

    if launched != accelerator.num_processes:
        raise LaunchError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); on a CPU launch with: {CPU_LAUNCH_LINE}; "
            "on GPUs: accelerate launch --multi_gpu --num_processes N -m posttrain.cli <command> ...")


def start_run(config):
    """Accelerator + what the user sees first: the resolved config (also saved as config.yaml) and
    the device line. Every recipe starts here."""
    from posttrain.config import validate_training_config
    from posttrain.engine.console import format_config, save_resolved_config
    from posttrain.engine.precision import resolve_precision

    validate_training_config(config)
    precision = resolve_precision(config)
    launched = prepare_multi_process_launch()
    accelerator = build_accelerator(mixed_precision=precision.autocast, report_to=config.report_to,
                                    output_dir=str(config.output_dir), seed=config.seed)
    check_multi_process_launch(accelerator, launched)
    accelerator.print(format_config(config))
    for note in precision.notes:
        accelerator.print(note)
    if accelerator.is_main_process:
        save_resolved_config(config, config.output_dir)
    accelerator.print(describe_device(accelerator))
    return accelerator
