"""TRL side of the DPO benchmark: one DPOTrainer run on the benchmark workload, results as JSON.

Run with the benchmark venv (TRL is never a dependency of posttrain itself):

    .venv-bench/bin/python benchmarks/trl_dpo_runner.py --data benchmarks/.data/dpo.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/trl.json

What it measures (the same quantities as posttrain_dpo_runner.py):
- train_seconds: wall time from the start of the first optimizer step to the end of the last
  (TrainerCallback.on_step_begin of step 1 .. on_step_end of step N; data preparation, model
  loading, the reference copy, any reference precompute and saving are outside it),
- num_tokens: input tokens fed to the policy, padding excluded (the attention mask's sum; the
  padded size is reported too as num_padded_tokens),
- pairs: preference pairs trained on (half the rows of each batch),
- per-step loss / grad_norm / learning_rate / rewards / logps from the trainer's log,
- the tokenised dataset (prompt/chosen/rejected ids), dumped with --dump_tokens so the
  orchestrator can check that both tools train on the same tokens,
- peak RSS of this process (VmHWM) - the orchestrator measures it independently with wait4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from harness import make_step_timer, vm_hwm_kib, write_runner_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="preference JSONL (conversational prompt/chosen/rejected)")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--output_dir", default=None, help="trainer output dir (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss_type", default="sigmoid")
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--max_prompt_length", type=int, default=None,
                    help="ignored: TRL 1.x's DPOConfig has no max_prompt_length (recorded only)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast of forward/backward with fp32 weights and optimizer state")
    ap.add_argument("--precompute_ref_log_probs", action="store_true")
    ap.add_argument("--trl_defaults", action="store_true",
                    help="keep TRL's own bf16 / gradient_checkpointing defaults instead of fp32 / off")
    ap.add_argument("--dump_tokens", default=None, help="write the tokenised train set here")
    ap.add_argument("--no_save", action="store_true", help="skip saving the final model")
    args = ap.parse_args()

    t_process = time.perf_counter()
    import tempfile

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-trl-dpo-")

    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    dataset = Dataset.from_list(rows)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    precision = {} if args.trl_defaults else {
        "bf16": args.precision == "bf16",  # TRL's default True: set as posttrain's row (autocast, fp32 weights)
        "fp16": False,
        "gradient_checkpointing": args.gradient_checkpointing,  # TRL defaults to True
    }
    config = DPOConfig(
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
        beta=args.beta,
        loss_type=[args.loss_type],
        max_length=args.max_length,
        precompute_ref_log_probs=args.precompute_ref_log_probs,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **precision,
    )

    class CountingDPOTrainer(DPOTrainer):
        """Counts the tokens and pairs of every micro-batch, times the reference precompute."""

        def __init__(self, *a, **kw):
            self.step_tokens: list[int] = []
            self.step_padded_tokens: list[int] = []
            self.step_pairs: list[int] = []
            self.precompute_seconds = 0.0
            super().__init__(*a, **kw)

        def _precompute_ref_logps(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **kw)
            finally:
                self.precompute_seconds += time.perf_counter() - t0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.step_tokens.append(int(inputs["attention_mask"].sum()))
            self.step_padded_tokens.append(int(inputs["input_ids"].numel()))
            self.step_pairs.append(int(inputs["input_ids"].size(0)) // 2)
            return super().training_step(model, inputs, num_items_in_batch)

    timer = make_step_timer()
    torch.manual_seed(args.seed)
    trainer = CountingDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    ref_separate = trainer.ref_model is not None and trainer.ref_model is not model
    if args.dump_tokens:
        Path(args.dump_tokens).write_text(json.dumps(
            [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in trainer.train_dataset]))
    t_setup_done = time.perf_counter()
    hwm_before_train = vm_hwm_kib()
    trainer.train()
    t_train_done = time.perf_counter()
    if not args.no_save:
        trainer.save_model(output_dir)
    t_end = time.perf_counter()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    train_seconds = timer.step_end_times[-1] - timer.t_first_begin
    num_tokens = sum(trainer.step_tokens)
    pairs = sum(trainer.step_pairs)
    steady = None
    if steps >= 2:
        steady_secs = timer.step_end_times[-1] - timer.step_end_times[0]
        steady = {"seconds": steady_secs, "tokens_per_second": sum(trainer.step_tokens[1:]) / steady_secs,
                  "steps_per_second": (steps - 1) / steady_secs}
    per_step = []
    prev = timer.t_first_begin
    keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected")
    for i, t in enumerate(timer.step_end_times):
        log = logs[i] if i < len(logs) else {}
        per_step.append({
            "step": i + 1,
            "loss": log.get("loss"),
            "grad_norm": log.get("grad_norm"),
            "learning_rate": log.get("learning_rate"),
            **{k: log.get(k) for k in keys},
            "pairs": trainer.step_pairs[i] if i < len(trainer.step_pairs) else None,
            "num_tokens": trainer.step_tokens[i] if i < len(trainer.step_tokens) else None,
            "num_padded_tokens": trainer.step_padded_tokens[i] if i < len(trainer.step_padded_tokens) else None,
            "step_seconds": t - prev,
            "elapsed_seconds": t - timer.t_first_begin,
        })
        prev = t
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "precision": "bf16" if config.bf16 else "fp32",
        "weights_dtype": str(next(model.parameters()).dtype),
        "padding_free": False,  # TRL 1.x's DPO: padded batches (its padding_free falls back to padding)
        "reference": ("precomputed" if args.precompute_ref_log_probs else
                      "separate copy" if ref_separate else "policy itself"),
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        "precompute_seconds": trainer.precompute_seconds if args.precompute_ref_log_probs else None,
        "train_rows": len(trainer.train_dataset),
        "steps": steps,
        "pairs": pairs,
        "train_seconds": train_seconds,
        "num_tokens": num_tokens,
        "num_padded_tokens": sum(trainer.step_padded_tokens),
        "tokens_per_second": num_tokens / train_seconds,
        "pairs_per_second": pairs / train_seconds,
        "steps_per_second": steps / train_seconds,
        "steady": steady,
        "first_loss": logs[0]["loss"] if logs else None,
        "last_loss": logs[-1]["loss"] if logs else None,
        "trl_logged_num_tokens": logs[-1].get("num_tokens") if logs else None,
        "setup_seconds": t_setup_done - t_process,
        "save_seconds": t_end - t_train_done,
        "process_seconds": t_end - t_process,
        "vm_hwm_before_train_kib": hwm_before_train,
        "vm_hwm_kib": vm_hwm_kib(),
        "per_step": per_step,
        "output_dir": output_dir,
    }
    write_runner_result(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
