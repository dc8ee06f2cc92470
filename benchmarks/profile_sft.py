"""Where a `posttrain sft` step spends its time, by torch.profiler, in fp32 or bf16 autocast.

    .venv/bin/python benchmarks/profile_sft.py --precision bf16                  # batch 4 x packed 256, 3 steps
    .venv/bin/python benchmarks/profile_sft.py --precision fp32 --batch_size 1 --max_length 128 --steps 2

Runs posttrain's own SFT recipe in this process (the CLI's config parser and `sft()`, the
benchmark's data and the embedded SmolLM2-135M-Instruct), with torch.profiler recording every
optimizer step after the first (step 1 pays one-off costs). Prints:
- the phases of a step (CPU total per profiled step): the log-prob head forward (chunked
  log-softmax over the vocabulary, models/logprobs.py), its backward, the optimizer step, the
  backbone (the rest),
- op categories by self CPU time: matmuls, dtype casts (autocast's per-call weight casts are
  aten::_to_copy / aten::copy_), attention, the optimizer, elementwise and small kernels,
- the top ops by self CPU time,
and writes them as JSON (--out). Timings on a shared machine are noisy: compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402
from harness import (  # noqa: E402
    cpu_busy_seconds,
    default_model_dir,
    machine_peak,
    mfu,
    model_flops,
    model_params,
    print_peak,
)

HEAD_FORWARD = "posttrain: log-prob head forward"
CATEGORIES = (  # (category, op names), first match wins; self CPU time
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("dtype casts (to/copy)", ("aten::_to_copy", "aten::copy_", "aten::to")),
    ("attention (sdpa)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("optimizer (fused AdamW)", ("aten::_fused_adamw", "aten::_foreach")),
    ("log-softmax pieces (logsumexp, exp, gather, scatter)", ("aten::logsumexp", "aten::exp", "aten::gather",
                                                             "aten::scatter", "aten::log_softmax", "aten::max")),
)
PHASES = {  # phase: profiler event name (CPU total per event)
    "log-prob head forward": HEAD_FORWARD,
    "log-prob head backward": "_ChunkedTokenLogProbsBackward",
    "optimizer step": "Optimizer.step#",
}


def category(name: str) -> str:
    for cat, prefixes in CATEGORIES:
        if any(name.startswith(p) for p in prefixes):
            return cat
    return "other (elementwise, norms, small kernels)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps; all but the first are profiled")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="JSON summary (default: results/profile-sft-<precision>.json)")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import posttrain.models.logprobs as logprobs
    from posttrain.cli import parse_config
    from posttrain.config import SFTConfig
    from posttrain.engine.session import TrainingSession
    from posttrain.recipes.sft import sft

    peak = machine_peak()
    print_peak(peak)
    model_dir = default_model_dir(None)
    data = workload.write_jsonl(HERE / ".data" / "sft.jsonl", rows=workload.DEFAULT_ROWS, seed=workload.DEFAULT_SEED)
    out_dir = Path(tempfile.mkdtemp(prefix="profile-sft-"))
    argv = ["--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out_dir / "run"),
            "--dtype", "float32", "--bf16", "true" if args.precision == "bf16" else "false",
            "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", "1", "--learning_rate", "2e-5", "--seed", "42",
            "--max_length", str(args.max_length), "--packing", "--logging_steps", "1", "--save_steps", "0",
            "--report_to", "none", "--disable_tqdm"]
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    config = parse_config(SFTConfig, argv)

    # Instrumentation only (this process): name the head's forward, advance the profiler per step.
    original_head, original_finish = logprobs.token_logprobs_from_hidden, TrainingSession.finish_step

    def head(*a, **kw):
        with record_function(HEAD_FORWARD):
            return original_head(*a, **kw)

    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=torch.profiler.schedule(wait=1, warmup=0, active=args.steps - 1, repeat=1))
    step_tokens: list[int] = []

    def finish_step(self, step, *, loss, tokens, metrics):
        stop = original_finish(self, step, loss=loss, tokens=tokens, metrics=metrics)
        step_tokens.append(tokens)
        prof.step()
        return stop

    logprobs.token_logprobs_from_hidden, TrainingSession.finish_step = head, finish_step
    import resource
    import time

    busy0, own0, t0 = cpu_busy_seconds(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        with prof:
            sft(config)
    finally:
        logprobs.token_logprobs_from_hidden, TrainingSession.finish_step = original_head, original_finish

    own1, busy1, wall = resource.getrusage(resource.RUSAGE_SELF), cpu_busy_seconds(), time.perf_counter() - t0
    own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - own) / wall)
    events = prof.key_averages()
    profiled = max(args.steps - 1, 1)
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    step_total = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep")) / 1e6

    def total(name: str) -> float:
        return sum(e.cpu_time_total for e in events if e.key.startswith(name) or name in e.key) / 1e6

    phases = {k: total(v) / profiled for k, v in PHASES.items()}
    step_seconds = (step_total or self_total) / profiled
    phases["backbone forward + backward + rest"] = step_seconds - sum(phases.values())
    cats: dict[str, float] = {}
    for e in events:
        if e.key.startswith("ProfilerStep"):
            continue
        cats[category(e.key)] = cats.get(category(e.key), 0.0) + e.self_cpu_time_total / 1e6 / profiled
    top = sorted((e for e in events if not e.key.startswith("ProfilerStep")), key=lambda e: -e.self_cpu_time_total)
    top = [{"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / profiled, "calls_per_step": e.count / profiled,
            "share": e.self_cpu_time_total / 1e6 / max(self_total, 1e-9)} for e in top[: args.top]]

    steady_tokens = sum(step_tokens[1:]) / max(len(step_tokens) - 1, 1)
    n_params = model_params(model_dir)
    achieved = mfu(model_flops(n_params, steady_tokens), step_seconds, peak, args.precision)
    print(f"\nposttrain sft, {args.precision}{' + grad ckpt' if args.gradient_checkpointing else ''}, "
          f"batch {args.batch_size} x packed {args.max_length}: {profiled} profiled steps, "
          f"{step_seconds:.2f} CPU-profiled s/step, {steady_tokens:.0f} tokens/step, "
          f"MFU {fmt_pct(achieved)} of the {args.precision} peak ({peak[args.precision + '_gflops']:.1f} GFLOP/s); "
          f"other processes used {other if other is None else round(other, 2)} cores meanwhile")
    print("\nphases (CPU total per step, s):")
    for k, v in phases.items():
        print(f"  {k:<45}{v:8.3f}  {v / step_seconds:6.1%}")
    print("\nop categories (self CPU per step, s):")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<55}{v:8.3f}  {v / max(sum(cats.values()), 1e-9):6.1%}")
    print(f"\ntop {args.top} ops by self CPU time:")
    for r in top:
        print(f"  {r['op']:<55}{r['self_s_per_step']:8.3f} s/step  {r['share']:6.1%}  {r['calls_per_step']:7.0f} calls")
    summary = {"precision": args.precision, "batch_size": args.batch_size, "max_length": args.max_length,
               "gradient_checkpointing": args.gradient_checkpointing, "profiled_steps": profiled,
               "tokens_per_step": steady_tokens, "profiled_step_seconds": step_seconds, "mfu": achieved,
               "other_cores_busy_during": other,
               "matmul_peak": peak, "phases": phases, "categories": cats, "top_ops": top}
    out = Path(args.out or HERE / "results" / f"profile-sft-{args.precision}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten: {out}")
    return 0


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


if __name__ == "__main__":
    sys.exit(main())
