"""posttrain side of the SFT benchmark: one `posttrain sft` run on the benchmark workload.

Runs the CLI exactly as a user would (a subprocess of this script, with flags equivalent to the
TRL runner's SFTConfig), then reads OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/run_summary.json
and writes the same JSON result shape as trl_sft_runner.py:

    .venv/bin/python benchmarks/posttrain_sft_runner.py --data benchmarks/.data/sft.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/posttrain.json

- train_seconds: from the start of the first optimizer step to the end of the last, as posttrain
  records it (run_summary.json `train_seconds`, cross-checked with the last metrics line's
  `elapsed_seconds`),
- num_tokens: input tokens fed to the model (sum of the per-step `num_tokens`),
- peak_rss_kib: the CLI process's peak RSS, from os.wait4 on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

from harness import posttrain_version, read_run, run_cli, write_runner_result


def _first(d: dict, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="JSONL written by workload.py")
    ap.add_argument("--data_format", choices=["messages", "prompt_completion"], default="messages")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--output_dir", default=None, help="posttrain output dir (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast of forward/backward with fp32 weights and optimizer state")
    ap.add_argument("--loss_on", choices=["all", "completion"], default="all")
    ap.add_argument("--posttrain", default=str(Path(sys.executable).parent / "posttrain"),
                    help="the posttrain executable")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra flags passed to posttrain sft")
    args = ap.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-posttrain-sft-"))
    if output_dir.exists():
        shutil.rmtree(output_dir)  # a fresh run, never a resume
    data = args.data
    if args.data_format == "prompt_completion":
        data = str(Path(args.data).with_suffix(".prompt_completion.jsonl"))
        with open(args.data, encoding="utf-8") as src, open(data, "w", encoding="utf-8") as dst:
            for line in src:
                if line.strip():
                    r = json.loads(line)
                    dst.write(json.dumps({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}) + "\n")

    cmd = [
        args.posttrain, "sft",
        "--model_name_or_path", args.model_dir,
        "--dataset_name", data,
        "--output_dir", str(output_dir),
        "--dtype", "float32",  # fp32 master weights in both precisions
        "--bf16", "true" if args.precision == "bf16" else "false",
        "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1",
        "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed),
        "--max_length", str(args.max_length),
        "--packing",
        "--logging_steps", "1",
        "--save_steps", "0",
        "--report_to", "none",
        "--disable_tqdm",
    ]
    if args.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    if args.data_format == "prompt_completion":
        cmd += ["--completion_only_loss", "true" if args.loss_on == "completion" else "false"]
    cmd += args.extra

    proc = run_cli(cmd)
    steps_log, summary = read_run(output_dir)

    per_step = []
    prev_elapsed = 0.0
    for rec in steps_log:
        elapsed = _first(rec, "elapsed_seconds", "elapsed")
        per_step.append({
            "step": rec.get("step"),
            "loss": rec.get("loss"),
            "grad_norm": rec.get("grad_norm"),
            "learning_rate": _first(rec, "learning_rate", "lr"),
            "num_tokens": _first(rec, "num_tokens", "tokens"),
            "num_loss_tokens": _first(rec, "num_loss_tokens", "num_trained_tokens", "loss_tokens"),
            "step_seconds": (elapsed - prev_elapsed) if elapsed is not None else None,
            "elapsed_seconds": elapsed,
            "tokens_per_second": rec.get("tokens_per_second"),
        })
        if elapsed is not None:
            prev_elapsed = elapsed

    # metrics.jsonl's num_tokens may be per step or cumulative (TRL's convention): it is
    # cumulative when it never decreases and its last value is the run's total.
    raw = [p["num_tokens"] for p in per_step]
    cumulative = (
        len(raw) > 1 and all(t is not None for t in raw) and all(b >= a for a, b in itertools.pairwise(raw))
        and summary.get("num_tokens") == raw[-1]
    )
    if cumulative:
        for p, prev in zip(per_step, [0, *raw[:-1]]):
            p["num_tokens"] = p["num_tokens"] - prev
    steps = _first(summary, "steps", "global_step", default=per_step[-1]["step"] if per_step else 0)
    train_seconds = _first(summary, "train_seconds", default=per_step[-1]["elapsed_seconds"] if per_step else None)
    step_tokens = [p["num_tokens"] for p in per_step]
    num_tokens = sum(step_tokens) if all(t is not None for t in step_tokens) and step_tokens else None
    summary_tokens = summary.get("num_tokens")
    if num_tokens is None:
        num_tokens = summary_tokens
    loss_tokens = [p["num_loss_tokens"] for p in per_step]
    steady = None
    if len(per_step) >= 2 and all(p["elapsed_seconds"] is not None for p in per_step) and num_tokens:
        steady = sum(step_tokens[1:]) / (per_step[-1]["elapsed_seconds"] - per_step[0]["elapsed_seconds"])
    result = {
        "tool": "posttrain",
        "versions": {"posttrain": posttrain_version()},
        "command": cmd,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": steps,
        "train_seconds": train_seconds,
        "num_tokens": num_tokens,
        "num_loss_tokens": sum(loss_tokens) if loss_tokens and all(t is not None for t in loss_tokens) else None,
        "tokens_per_second": (num_tokens / train_seconds) if num_tokens and train_seconds else None,
        "steady_tokens_per_second": steady,
        "first_loss": _first(summary, "first_loss", default=steps_log[0]["loss"] if steps_log else None),
        "last_loss": _first(summary, "last_loss", default=steps_log[-1]["loss"] if steps_log else None),
        "summary_num_tokens": summary_tokens,
        "metrics_num_tokens_is_cumulative": cumulative,
        "summary_tokens_per_second": summary.get("tokens_per_second"),
        "last_line_elapsed_seconds": per_step[-1]["elapsed_seconds"] if per_step else None,
        "process_seconds": proc["process_seconds"],
        "peak_rss_kib": proc["peak_rss_kib"],
        "run_summary": summary,
        "per_step": per_step,
        "output_dir": str(output_dir),
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    main()
