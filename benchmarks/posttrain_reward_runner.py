"""posttrain side of the reward benchmark: one `posttrain reward` CLI run, results as JSON.

    .venv/bin/python benchmarks/posttrain_reward_runner.py --data benchmarks/.data/reward.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/posttrain.json [--padding_free]

Runs the CLI as a user would (a child process, flags equivalent to trl_reward_runner.py's
RewardConfig), then reads OUTPUT_DIR/metrics.jsonl (per step; `num_tokens` there is cumulative) and
run_summary.json (`train_seconds`: the summed optimizer-step times, first step start .. last end).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from harness import read_run, run_cli, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per step (per device)")
    ap.add_argument("--learning_rate", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--padding_free", action="store_true")
    ap.add_argument("--posttrain", default=str(Path(sys.executable).parent / "posttrain"))
    args = ap.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-posttrain-reward-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run, never a resume
    cmd = [args.posttrain, "reward", "--model_name_or_path", args.model_dir, "--dataset_name", args.data,
           "--output_dir", str(output_dir), "--dtype", "float32", "--max_steps", str(args.steps),
           "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
           "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "linear", "--max_grad_norm", "1.0",
           "--seed", str(args.seed), "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length),
           "--logging_steps", "1", "--save_steps", "0", "--report_to", "none", "--disable_tqdm", "--bf16", "false"]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    if args.padding_free:
        cmd.append("--padding_free")
    proc = run_cli(cmd)
    steps_log, summary = read_run(output_dir)
    per_step, prev_elapsed, prev_tokens = [], 0.0, 0
    for rec in steps_log:
        per_step.append({"step": rec["step"], "loss": rec["loss"], "grad_norm": rec["grad_norm"],
                         "learning_rate": rec["learning_rate"], "accuracy": rec["accuracy"], "margin": rec["margin"],
                         "pairs": args.batch_size, "num_tokens": rec["num_tokens"] - prev_tokens,
                         "step_seconds": rec["elapsed_seconds"] - prev_elapsed})
        prev_elapsed, prev_tokens = rec["elapsed_seconds"], rec["num_tokens"]
    train_seconds = summary["train_seconds"]
    pairs = args.batch_size * len(per_step)
    steady = None
    if len(per_step) >= 2:
        steady = (pairs - args.batch_size) / (steps_log[-1]["elapsed_seconds"] - steps_log[0]["elapsed_seconds"])
    result = {
        "tool": "posttrain",
        "command": cmd,
        "padding_free": args.padding_free,
        "steps": summary["steps"],
        "train_seconds": train_seconds,
        "pairs": pairs,
        "num_tokens": summary["num_tokens"],
        "pairs_per_second": pairs / train_seconds,
        "steady_pairs_per_second": steady,
        "tokens_per_second": summary["num_tokens"] / train_seconds,
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "process_seconds": proc["process_seconds"],
        "peak_rss_kib": proc["peak_rss_kib"],
        "run_summary": summary,
        "per_step": per_step,
        "output_dir": str(output_dir),
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    main()
