"""One precision policy for every recipe, in the accelerate / HF Trainer convention (docs/precision.md).

- Trained weights and AdamW's state are fp32 (master weights) unless the user asks otherwise with
  ``--low_precision_master_weights true``: bf16 keeps 8 significant bits, so an update smaller
  than ~2^-8 of a weight rounds away (pitfall 23).
- ``--bf16`` / ``--fp16`` mean autocast of the forward and backward (accelerate's mixed_precision);
  fp16 adds a gradient scaler, whose overflowing steps are skipped (engine/session.py).
- ``--bf16`` unset (auto): bf16 autocast where the hardware multiplies bf16 fast — CUDA with bf16,
  a CPU with AMX-BF16 or AVX512-BF16 — else fp32. ``POSTTRAIN_AUTO_PRECISION=fp32|bf16`` pins
  what auto means (the test suite pins fp32, so a test computes the same on every CPU).
- ``--dtype bfloat16`` / ``float16`` alone: fp32 master weights and autocast in that dtype
  (with ``--use_peft`` the frozen base is held in that dtype; the adapter trains in fp32).
- Every separately loaded model gets the policy's load kwargs (models/loading.model_load_kwargs)
  and autocast (:func:`autocast_frozen`), so a reference equal to the policy gives bit-identical
  log-probs: KL 0 and DPO's ln 2 at step 0 in every precision.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import torch

AUTO_ENV = "POSTTRAIN_AUTO_PRECISION"
FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # /proc/cpuinfo names

LOW_PRECISION_WARNING = (
    "warning: --low_precision_master_weights: the trained weights and AdamW's state are bfloat16. bf16 keeps "
    "8 significant bits, so any update smaller than ~2^-8 (0.4%) of a weight rounds away: at a learning "
    "rate like 1e-6 almost every AdamW step is lost. Use it only when fp32 master weights do not fit.")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is no such file."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _torch_reports_fast_bf16() -> bool:
    """torch's own cpuinfo probes (any OS); private helpers, so absent ones read as no."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_has_fast_bf16() -> bool:
    """True on a CPU with AMX-BF16 or AVX512-BF16, where bf16 matmuls beat fp32 (elsewhere bf16 is
    emulated and slower). torch.backends.cpu.get_cpu_capability() says only AVX2/AVX512, not bf16,
    so the flags are read directly."""
    flags = _cpu_flags()
    if flags is not None:
        return bool(FAST_BF16_CPU_FLAGS & flags)
    return _torch_reports_fast_bf16()


def default_device_type() -> str:
    """The device type accelerate will pick (before the Accelerator exists)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_bf16(device_type: str) -> bool:
    """What ``--bf16`` unset means on this hardware (``POSTTRAIN_AUTO_PRECISION`` overrides)."""
    override = os.environ.get(AUTO_ENV, "").strip().lower()
    if override:
        if override not in ("fp32", "bf16"):
            raise ValueError(f"{AUTO_ENV}={override!r}: expected fp32 or bf16")
        return override == "bf16"
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    return False


@dataclass(frozen=True)
class Precision:
    autocast: str  # accelerate's mixed_precision: "no" | "bf16" | "fp16"
    low_precision_master_weights: bool
    notes: tuple[str, ...] = ()  # printed at start


def _dtype_name(dtype) -> str:
    from posttrain.models.loading import resolve_dtype

    if str(dtype).lower() == "auto":
        return "auto"
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
            torch.float64: "float64"}[resolve_dtype(dtype)]


def resolve_precision(config, device_type: str | None = None) -> Precision:
    """The run's autocast and master-weight dtype from --dtype, --bf16, --fp16 and
    --low_precision_master_weights (a ConfigError names any contradiction)."""
    from posttrain.config import ConfigError

    device_type = device_type or default_device_type()
    dtype = _dtype_name(config.dtype)
    bf16, fp16 = config.bf16, config.fp16
    low = bool(getattr(config, "low_precision_master_weights", False))
    notes: list[str] = []
    if bf16 and fp16:
        raise ConfigError("choose one of --bf16 and --fp16")
    if low:
        if dtype != "bfloat16":
            raise ConfigError("--low_precision_master_weights needs --dtype bfloat16 (fp16 weights cannot be "
                              "trained: a gradient scaler refuses fp16 gradients)")
        if fp16:
            raise ConfigError("--low_precision_master_weights (bf16 weights) contradicts --fp16")
        autocast = "no" if bf16 is False else "bf16"
        notes.append(LOW_PRECISION_WARNING)
    elif dtype in ("bfloat16", "float16"):
        autocast = "bf16" if dtype == "bfloat16" else "fp16"
        if (autocast == "bf16" and (fp16 or bf16 is False)) or (autocast == "fp16" and bf16):
            raise ConfigError(f"--dtype {dtype} means {autocast} autocast here; it contradicts "
                              f"--bf16 {bf16} / --fp16 {fp16}")
        held = ("the frozen base is held in " + dtype + ", the adapter trains in fp32"
                if getattr(config, "use_peft", False) else "weights load in fp32 (master weights)")
        notes.append(f"precision: --dtype {dtype}: {held}, forward/backward under {autocast} autocast; "
                     "--low_precision_master_weights true trains pure bf16 weights instead")
    elif fp16:
        autocast = "fp16"
    elif bf16:
        autocast = "bf16"
    elif bf16 is None and dtype == "auto":
        autocast = "bf16" if auto_bf16(device_type) else "no"
        why = "fast bf16 on this device" if autocast == "bf16" else "no fast bf16 on this device"
        notes.append(f"precision: --bf16 auto -> {'bf16 autocast' if autocast == 'bf16' else 'fp32'} ({why}); "
                     "fp32 master weights")
    else:
        autocast = "no"  # --bf16 false, or --dtype float32 asked for fp32
    if autocast == "fp16" and device_type != "cuda":
        raise ConfigError("--fp16 needs a CUDA GPU (accelerate runs fp16 on a CPU as plain fp32); use --bf16")
    if autocast == "bf16" and device_type == "cpu" and not cpu_has_fast_bf16() and bf16:
        notes.append("precision: this CPU has no AMX/AVX512-BF16: bf16 autocast is emulated, slower than fp32")
    return Precision(autocast=autocast, low_precision_master_weights=low, notes=tuple(notes))


def autocast_frozen(module: torch.nn.Module | None, accelerator) -> torch.nn.Module | None:
    """Run a frozen model's forward under the run's autocast, as accelerate does for the prepared
    policy (it patches only what goes through ``prepare``): a reference equal to the policy then
    computes bit-identical log-probs in every precision. Idempotent; None passes through."""
    if module is None or getattr(module, "_posttrain_autocast", False) or accelerator.mixed_precision == "no":
        return module
    forward = module.forward

    @wraps(forward)
    def autocast_forward(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    module.forward = autocast_forward
    module._posttrain_autocast = True
    return module


def autocast_reference(reference, accelerator):
    """:func:`autocast_frozen` on a ReferencePolicy's separate scorer (adapter-disabled mode runs
    the prepared policy itself, already under autocast)."""
    if reference is not None and getattr(reference, "scorer", None) is not None:
        autocast_frozen(reference.scorer, accelerator)
    return reference
