"""posttrain side of the GRPO benchmark: one `posttrain grpo` CLI run, results as JSON.

    .venv/bin/python benchmarks/posttrain_grpo_runner.py --data benchmarks/.data/grpo.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/posttrain.json

Runs the CLI as a user would, with flags equivalent to trl_grpo_runner.py's GRPOConfig and the
same reward function (`--reward_funcs grpo_reward:arithmetic_reward`, benchmarks/ on PYTHONPATH),
then reads OUTPUT_DIR/metrics.jsonl (per step: reward, completion length, cumulative
`elapsed_seconds`) and run_summary.json (`train_seconds`: the summed optimizer-step times,
generation included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from harness import HERE, posttrain_version, read_run, run_cli, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts_per_step", type=int, default=2)
    ap.add_argument("--num_generations", type=int, default=8)
    ap.add_argument("--max_completion_length", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--loss_type", default="dapo")
    ap.add_argument("--scale_rewards", default="group")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast of forward/backward with fp32 weights and optimizer state")
    ap.add_argument("--posttrain", default=str(Path(sys.executable).parent / "posttrain"))
    args = ap.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-posttrain-grpo-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run, never a resume
    completions_per_step = args.prompts_per_step * args.num_generations
    cmd = [args.posttrain, "grpo", "--model_name_or_path", args.model_dir, "--dataset_name", args.data,
           "--output_dir", str(output_dir), "--dtype", "float32",
           "--bf16", "true" if args.precision == "bf16" else "false",
           "--reward_funcs", "grpo_reward:arithmetic_reward",
           "--max_steps", str(args.steps), "--per_device_train_batch_size", str(completions_per_step),
           "--gradient_accumulation_steps", "1", "--num_generations", str(args.num_generations),
           "--max_completion_length", str(args.max_completion_length), "--temperature", str(args.temperature),
           "--top_p", "1.0", "--top_k", "0", "--learning_rate", str(args.learning_rate),
           "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--weight_decay", "0.0", "--max_grad_norm", "1.0",
           "--beta", str(args.beta), "--num_iterations", "1", "--epsilon", "0.2", "--loss_type", args.loss_type,
           "--scale_rewards", args.scale_rewards, "--mask_truncated_completions", "false",
           "--seed", str(args.seed), "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
           "--disable_tqdm"]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    proc = run_cli(cmd, env=env)
    steps_log, summary = read_run(output_dir)

    per_step, prev_elapsed = [], 0.0
    for rec in steps_log:
        per_step.append({"step": rec["step"], "loss": rec["loss"], "reward": rec.get("reward"),
                         "reward_std": rec.get("reward_std"), "grad_norm": rec.get("grad_norm"),
                         "completions/mean_length": rec.get("completions/mean_length"),
                         "completions/clipped_ratio": rec.get("completions/clipped_ratio"),
                         "completions": completions_per_step, "step_seconds": rec["elapsed_seconds"] - prev_elapsed})
        prev_elapsed = rec["elapsed_seconds"]
    result = {
        "tool": "posttrain",
        "versions": {"posttrain": posttrain_version()},
        "command": cmd,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": summary.get("steps", len(per_step)),
        "train_seconds": summary.get("train_seconds", prev_elapsed),
        "per_step": per_step,
        "process_seconds": proc["process_seconds"],
        "peak_rss_kib": proc["peak_rss_kib"],
        "run_summary": summary,
        "output_dir": str(output_dir),
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    main()
