"""posttrain side of the DPO benchmark: one `posttrain dpo` run on the benchmark workload.

Runs the CLI exactly as a user would (a subprocess of this script, with flags equivalent to the
TRL runner's DPOConfig), then reads OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/run_summary.json
and writes the same JSON result shape as trl_dpo_runner.py:

    .venv/bin/python benchmarks/posttrain_dpo_runner.py --data benchmarks/.data/dpo.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/posttrain.json \
        [--precompute_ref_log_probs]

- train_seconds: from the start of the first optimizer step to the end of the last, as posttrain
  records it (run_summary.json `train_seconds`, cross-checked with the last metrics line's
  `elapsed_seconds`),
- num_tokens: input tokens fed to the policy, padding excluded (per-step differences of the
  cumulative `num_tokens` of metrics.jsonl),
- pairs: steps x batch size (every step of posttrain's batch plan is full),
- precompute_seconds (--precompute_ref_log_probs): the wall time between the CLI's
  "reference: ..." line and its "reference log-probs: computed ..." line, timestamped as the
  lines arrive (the reference pass over the whole train set, plus the sha256 of the reference
  weights that keys the cache). The cache goes to a fresh POSTTRAIN_CACHE so it is computed,
  never loaded from an earlier run.
- peak_rss_kib: the CLI process's peak RSS, from os.wait4 on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness import posttrain_version, read_run, run_cli, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="preference JSONL (conversational prompt/chosen/rejected)")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--output_dir", default=None, help="posttrain output dir (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss_type", default="sigmoid")
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--max_prompt_length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast of forward/backward with fp32 weights and optimizer state")
    ap.add_argument("--padding_free", action="store_true")
    ap.add_argument("--precompute_ref_log_probs", action="store_true")
    ap.add_argument("--posttrain", default=str(Path(sys.executable).parent / "posttrain"),
                    help="the posttrain executable")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra flags passed to posttrain dpo")
    args = ap.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-posttrain-dpo-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run, never a resume

    cmd = [
        args.posttrain, "dpo",
        "--model_name_or_path", args.model_dir,
        "--dataset_name", args.data,
        "--output_dir", str(output_dir),
        "--dtype", "float32",  # fp32 master weights in both precisions
        "--bf16", "true" if args.precision == "bf16" else "false",
        "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1",
        "--learning_rate", str(args.learning_rate),
        "--lr_scheduler_type", "linear",
        "--warmup_steps", "0",
        "--weight_decay", "0.0",
        "--max_grad_norm", "1.0",
        "--beta", str(args.beta),
        "--loss_type", args.loss_type,
        "--max_length", str(args.max_length),
        "--max_prompt_length", str(args.max_prompt_length),
        "--seed", str(args.seed),
        "--logging_steps", "1",
        "--save_steps", "0",
        "--report_to", "none",
        "--disable_tqdm",
    ]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    if args.padding_free:
        cmd.append("--padding_free")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cache_dir = None
    if args.precompute_ref_log_probs:
        cmd.append("--precompute_ref_log_probs")
        cache_dir = tempfile.mkdtemp(prefix="bench-posttrain-cache-")
        env["POSTTRAIN_CACHE"] = cache_dir  # a cold cache: the reference pass really runs
    cmd += args.extra

    try:
        proc = run_cli(cmd, env=env, stamp_lines=True)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    stamped = proc["lines"]  # (seconds since start, line) of the CLI's output

    precompute_seconds = reference_line = None
    if args.precompute_ref_log_probs:
        t_ref = next((t for t, x in stamped if x.startswith("reference: ")), None)
        t_done = next((t for t, x in stamped if x.startswith("reference log-probs: computed")), None)
        reference_line = next((x for _, x in stamped if x.startswith("reference log-probs:")), None)
        if t_ref is not None and t_done is not None:
            precompute_seconds = t_done - t_ref

    steps_log, summary = read_run(output_dir)
    steps_log = [rec for rec in steps_log if rec.get("step", 0) > 0]

    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")
    per_step = []
    prev_elapsed, prev_tokens = 0.0, 0
    for rec in steps_log:
        elapsed, tokens = rec.get("elapsed_seconds"), rec.get("num_tokens")  # num_tokens is cumulative
        per_step.append({
            "step": rec.get("step"),
            "loss": rec.get("loss"),
            "grad_norm": rec.get("grad_norm"),
            "learning_rate": rec.get("learning_rate"),
            **{k: rec.get(k) for k in keys},
            "pairs": args.batch_size,
            "num_tokens": None if tokens is None else tokens - prev_tokens,
            "step_seconds": None if elapsed is None else elapsed - prev_elapsed,
            "elapsed_seconds": elapsed,
            "tokens_per_second": rec.get("tokens_per_second"),
        })
        prev_elapsed = elapsed if elapsed is not None else prev_elapsed
        prev_tokens = tokens if tokens is not None else prev_tokens

    steps = summary.get("steps", len(per_step))
    train_seconds = summary.get("train_seconds", per_step[-1]["elapsed_seconds"] if per_step else None)
    num_tokens = summary.get("num_tokens", prev_tokens)
    pairs = steps * args.batch_size
    steady = None
    if len(per_step) >= 2 and all(p["elapsed_seconds"] is not None for p in per_step):
        steady_secs = per_step[-1]["elapsed_seconds"] - per_step[0]["elapsed_seconds"]
        steady = {"seconds": steady_secs,
                  "tokens_per_second": sum(p["num_tokens"] for p in per_step[1:]) / steady_secs,
                  "steps_per_second": (len(per_step) - 1) / steady_secs}
    result = {
        "tool": "posttrain",
        "versions": {"posttrain": posttrain_version()},
        "command": cmd,
        "padding_free": args.padding_free,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "reference": "precomputed" if args.precompute_ref_log_probs else "separate copy",
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "precompute_seconds": precompute_seconds,
        "precompute_log_line": reference_line,
        "reference_log_line": next((x for _, x in stamped if x.startswith("reference: ")), None),
        "steps": steps,
        "pairs": pairs,
        "train_seconds": train_seconds,
        "num_tokens": num_tokens,
        "tokens_per_second": (num_tokens / train_seconds) if num_tokens and train_seconds else None,
        "pairs_per_second": (pairs / train_seconds) if train_seconds else None,
        "steps_per_second": (steps / train_seconds) if train_seconds else None,
        "steady": steady,
        "first_loss": summary.get("first_loss", steps_log[0]["loss"] if steps_log else None),
        "last_loss": summary.get("last_loss", steps_log[-1]["loss"] if steps_log else None),
        "last_line_elapsed_seconds": per_step[-1]["elapsed_seconds"] if per_step else None,
        "summary_peak_memory_bytes": summary.get("peak_memory_bytes"),
        "process_seconds": proc["process_seconds"],
        "peak_rss_kib": proc["peak_rss_kib"],
        "run_summary": summary,
        "per_step": per_step,
        "output_dir": str(output_dir),
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    main()
