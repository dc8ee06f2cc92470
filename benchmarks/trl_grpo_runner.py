"""TRL side of the GRPO benchmark: one GRPOTrainer run on the benchmark prompts, results as JSON.

Run with the benchmark venv (TRL is never a dependency of posttrain itself):

    .venv-bench/bin/python benchmarks/trl_grpo_runner.py --data benchmarks/.data/grpo.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/trl.json

Every GRPOConfig setting that changes the work is set explicitly (so a change of TRL's defaults
cannot change the benchmark): beta, loss_type, scale_rewards, num_iterations, epsilon, the
generation batch (one step's completions, generated at once), sampling (temperature, top_p 1,
top_k 0, no min_p, no repetition penalty), bf16 and gradient checkpointing off, no vLLM.

Measured as in the other TRL runners: train_seconds from the start of the first optimizer step
to the end of the last (TrainerCallback; generation happens inside the step), completions =
steps x completions per step, per-step reward / completion length / loss from the trainer's log.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch
from harness import make_step_timer, vm_hwm_kib, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="prompt JSONL (conversational 'prompt' + 'answer')")
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
    ap.add_argument("--no_save", action="store_true")
    args = ap.parse_args()

    t_process = time.perf_counter()
    import transformers
    import trl
    from datasets import Dataset
    from grpo_reward import arithmetic_reward
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-trl-grpo-")
    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    completions_per_step = args.prompts_per_step * args.num_generations
    config = GRPOConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=completions_per_step,
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # = generation_batch_size of one step's completions, sampled at once
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        beta=args.beta,  # TRL's default is 0.0 too; set so that a change of default cannot move it
        num_iterations=1,
        epsilon=0.2,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        mask_truncated_completions=False,
        use_vllm=False,
        bf16=args.precision == "bf16",  # TRL's default True: set as posttrain's row (autocast, fp32 weights)
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults to True: set as posttrain's row
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    timer = make_step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    t_setup = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter()
    if not args.no_save:
        trainer.save_model(output_dir)
    t_end = time.perf_counter()

    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = trainer.state.global_step
    train_seconds = timer.step_end_times[-1] - timer.t_first_begin
    step_seconds = timer.step_seconds()
    per_step = []
    for i, secs in enumerate(step_seconds):
        log = logs[i] if i < len(logs) else {}
        per_step.append({"step": i + 1, "loss": log.get("loss"), "reward": log.get("reward"),
                         "reward_std": log.get("reward_std"), "grad_norm": log.get("grad_norm"),
                         "completions/mean_length": log.get("completions/mean_length"),
                         "completions/clipped_ratio": log.get("completions/clipped_ratio"),
                         "completions": completions_per_step, "step_seconds": secs})
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "config": {k: getattr(config, k) for k in (
            "beta", "loss_type", "scale_rewards", "num_iterations", "epsilon", "epsilon_high", "generation_batch_size",
            "steps_per_generation", "num_generations", "max_completion_length", "temperature", "top_p", "top_k",
            "bf16", "gradient_checkpointing", "use_vllm", "mask_truncated_completions", "importance_sampling_level")},
        "precision": args.precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "weights_dtype": str(next(model.parameters()).dtype),
        "steps": steps,
        "train_seconds": train_seconds,
        "per_step": per_step,
        "setup_seconds": t_setup - t_process,
        "save_seconds": t_end - t_train,
        "process_seconds": t_end - t_process,
        "vm_hwm_kib": vm_hwm_kib(),
        "output_dir": output_dir,
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
