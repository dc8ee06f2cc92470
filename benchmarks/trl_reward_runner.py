"""TRL side of the reward benchmark: one RewardTrainer run on the preference workload, results as JSON.

Run with the benchmark venv (TRL is never a dependency of posttrain itself):

    .venv-bench/bin/python benchmarks/trl_reward_runner.py --data benchmarks/.data/reward.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/trl.json

Measured as in trl_sft_runner.py: train_seconds from the start of the first optimizer step to the
end of the last (TrainerCallback), tokens = attention_mask sum of every batch (padding excluded),
pairs = half the sequences of every batch, per-step loss / grad_norm / accuracy from the log.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from harness import make_step_timer, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="preference JSONL written by bench_reward.py")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per step (per device)")
    ap.add_argument("--learning_rate", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--no_save", action="store_true")
    args = ap.parse_args()

    t_process = time.perf_counter()
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-trl-reward-")
    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(args.seed)  # the new score head is drawn here, before the Trainer seeds anything
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=torch.float32)

    config = RewardConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults to True: set explicitly
        bf16=False,  # TRL defaults to bf16=True: the benchmark is fp32 on both sides
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class CountingRewardTrainer(RewardTrainer):
        def __init__(self, *a, **kw):
            self.step_tokens: list[int] = []
            self.step_pairs: list[int] = []
            self.step_padded: list[int] = []
            super().__init__(*a, **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens.append(int(inputs["attention_mask"].sum()))
            self.step_padded.append(int(inputs["input_ids"].numel()))
            self.step_pairs.append(int(inputs["input_ids"].shape[0]) // 2)
            return super().training_step(model, inputs, num_items_in_batch)

    timer = make_step_timer()
    torch.manual_seed(args.seed)
    trainer = CountingRewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    callbacks=[timer])
    t_setup = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter()
    if not args.no_save:
        trainer.save_model(output_dir)
    t_end = time.perf_counter()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    train_seconds = timer.step_end_times[-1] - timer.t_first_begin
    pairs, tokens = sum(trainer.step_pairs), sum(trainer.step_tokens)
    steady = None
    if steps >= 2:
        steady = sum(trainer.step_pairs[1:]) / (timer.step_end_times[-1] - timer.step_end_times[0])
    per_step = []
    prev = timer.t_first_begin
    for i, t in enumerate(timer.step_end_times):
        log = logs[i] if i < len(logs) else {}
        per_step.append({"step": i + 1, "loss": log.get("loss"), "grad_norm": log.get("grad_norm"),
                         "learning_rate": log.get("learning_rate"), "accuracy": log.get("accuracy"),
                         "margin": log.get("margin"), "pairs": trainer.step_pairs[i], "num_tokens": trainer.step_tokens[i],
                         "padded_tokens": trainer.step_padded[i], "step_seconds": t - prev})
        prev = t
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "train_seconds": train_seconds,
        "pairs": pairs,
        "num_tokens": tokens,
        "padded_tokens": sum(trainer.step_padded),
        "pairs_per_second": pairs / train_seconds,
        "steady_pairs_per_second": steady,
        "tokens_per_second": tokens / train_seconds,
        "first_loss": logs[0]["loss"] if logs else None,
        "last_loss": logs[-1]["loss"] if logs else None,
        "setup_seconds": t_setup - t_process,
        "save_seconds": t_end - t_train,
        "process_seconds": t_end - t_process,
        "per_step": per_step,
        "output_dir": output_dir,
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
