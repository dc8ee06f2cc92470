"""A synthetic run directory (metrics.jsonl, config.yaml, run_summary.json, eval.json,
eval_results.json) for the report tests: the numbers are made up, the file formats are real."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.config import GRPOConfig, config_to_dict


def write_run(run_dir: Path, *, steps: int = 12, with_eval: bool = True) -> Path:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "eval/loss": 0.9, "eval/rewards/accuracies": 0.5}]
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": 1.0 / s, "learning_rate": 1e-6, "grad_norm": 0.5 + 0.1 * s,
                     "reward": 0.1 * s, "reward_std": 0.2, "rewards/format/mean": 0.05 * s, "kl": 0.01 * s,
                     "entropy": 2.0 - 0.1 * s, "clip_ratio/low": 0.0, "completions/mean_length": 30 + s,
                     "rewards/accuracies": 0.5 + 0.03 * s, "rewards/margins": 0.2 * s, "num_tokens": 100 * s,
                     "tokens_per_second": 900.0, "epoch": s / steps, "elapsed_seconds": float(s)})
    rows.append({"step": steps, "eval/loss": 0.4, "eval/rewards/accuracies": 0.9})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += json.dumps({"step": steps + 1, "loss": "nan"}) + "\n" + '{"step": 99, "loss": 0.1'  # cut by a kill
    (run_dir / "metrics.jsonl").write_text(text)
    config = GRPOConfig(output_dir=str(run_dir), beta=0.04, max_steps=steps)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    (run_dir / "run_summary.json").write_text(json.dumps({"steps": steps, "train_seconds": 12.5, "first_loss": 1.0,
                                                          "last_loss": 1.0 / steps}))
    if with_eval:
        (run_dir / "eval_results.json").write_text(json.dumps({"eval/loss": 0.4, "eval/rewards/accuracies": 0.9}))
        record = {
            "model": "runs/grpo", "baseline": "runs/sft", "dataset": "held_out.jsonl", "num_prompts": 2,
            "settings": {"greedy": True, "num_samples": 4, "temperature": 1.0, "reward_funcs": ["accuracy"],
                         "num_shown_samples": 8},
            "metrics": {"model": {"greedy/reward": 0.75, "greedy/accuracy": 0.625, "sampled/pass@4": 0.875},
                        "baseline": {"greedy/reward": 0.25, "greedy/accuracy": 0.125, "sampled/pass@4": 0.5}},
            "comparison": {"greedy/win_rate": 0.8125, "sampled/kl_k1": 1.5, "sampled/kl_k3": 1.25},
            "samples": [
                {"row": 1, "prompt": "What is 2 + 3? <b>bold</b>", "answer": "5", "mode": "greedy",
                 "model": "2 + 3 = 5.\n#### 5", "model_reward": 1.0, "model_correct": True,
                 "baseline": "#### 6", "baseline_reward": 0.0, "baseline_correct": False},
                {"row": 2, "prompt": "What is 4 * 4?", "answer": "16", "mode": "greedy",
                 "model": "   ", "model_reward": 0.0, "model_correct": False,
                 "baseline": "#### 16", "baseline_reward": 1.0, "baseline_correct": True},
            ],
        }
        (run_dir / "eval.json").write_text(json.dumps(record))
    return run_dir
