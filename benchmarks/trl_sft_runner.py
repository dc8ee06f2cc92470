"""TRL side of the SFT benchmark: one SFTTrainer run on the benchmark workload, results as JSON.

Run with the benchmark venv (TRL is never a dependency of posttrain itself):

    .venv-bench/bin/python benchmarks/trl_sft_runner.py --data benchmarks/.data/sft.jsonl \
        --model_dir ~/.cache/posttrain/models/SmolLM2-135M-Instruct --out /tmp/trl.json

What it measures (the same quantities as posttrain_sft_runner.py):
- train_seconds: wall time from the start of the first optimizer step to the end of the last
  (TrainerCallback.on_step_begin of step 1 .. on_step_end of step N; data preparation, model
  loading and saving are outside it),
- num_tokens: input tokens fed to the model, padding excluded (with padding-free packing there
  is none: the packed row's length; with an attention mask: its sum),
- num_loss_tokens: tokens that carry a loss (labels != -100, after the one-token shift),
- per-step loss / grad_norm / learning_rate from the trainer's log (logging every step),
- peak RSS of this process (VmHWM) — the orchestrator measures it independently with wait4.
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
    ap.add_argument("--data", required=True, help="JSONL written by workload.py")
    ap.add_argument("--data_format", choices=["messages", "prompt_completion"], default="messages")
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--out", required=True, help="where to write the JSON result")
    ap.add_argument("--output_dir", default=None, help="trainer output dir (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32, or bf16 autocast of forward/backward with fp32 weights and optimizer state")
    ap.add_argument("--loss_on", choices=["all", "completion"], default="all",
                    help="all: every token (full sequence); completion: prompt/completion data, completion only")
    ap.add_argument("--dump_first_batch", default=None, help="write the first batch's documents (token ids) here")
    ap.add_argument("--no_save", action="store_true", help="skip saving the final model")
    args = ap.parse_args()

    t_process = time.perf_counter()
    import tempfile

    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-trl-sft-")

    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if args.data_format == "prompt_completion":
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    dataset = Dataset.from_list(rows)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)

    config = SFTConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        seed=args.seed,
        max_length=args.max_length,
        packing=True,  # default packing_strategy="bfd" => padding-free
        completion_only_loss=(args.loss_on == "completion") if args.data_format == "prompt_completion" else None,
        assistant_only_loss=False,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL defaults to True: set explicitly
        bf16=args.precision == "bf16",  # TRL's default True: set as posttrain's row (autocast, fp32 weights)
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    class CountingSFTTrainer(SFTTrainer):
        """Counts the tokens of every micro-batch fed to the model (for the benchmark only)."""

        def __init__(self, *a, **kw):
            self.step_tokens: list[int] = []
            self.step_loss_tokens: list[int] = []
            super().__init__(*a, **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if "attention_mask" in inputs:
                n = int(inputs["attention_mask"].sum())
            elif "position_ids" in inputs:  # padding-free: one flattened row, no padding
                n = int(inputs["position_ids"].size(1))
            else:
                n = int(inputs["input_ids"].numel())
            self.step_tokens.append(n)
            if args.dump_first_batch and len(self.step_tokens) == 1 and "position_ids" in inputs:
                # the documents of the first packed batch, for check_first_loss.py
                ids, pos = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
                docs = []
                for tok, p in zip(ids, pos):
                    if p == 0:
                        docs.append([])
                    docs[-1].append(tok)
                Path(args.dump_first_batch).write_text(json.dumps({"docs": docs}))
            labels = inputs.get("labels")
            if labels is not None:
                # the model predicts labels[1:] from positions [:-1]
                self.step_loss_tokens.append(int((labels[..., 1:] != -100).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    timer = make_step_timer()
    torch.manual_seed(args.seed)
    trainer = CountingSFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer]
    )
    padding_free = bool(getattr(trainer, "padding_free", False))
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
    # steady state: steps 2..N (the first step pays one-off costs: allocator warm-up, lazy inits)
    steady = None
    if steps >= 2:
        steady_secs = timer.step_end_times[-1] - timer.step_end_times[0]
        steady = sum(trainer.step_tokens[1:]) / steady_secs
    per_step = []
    prev = timer.t_first_begin
    for i, t in enumerate(timer.step_end_times):
        log = logs[i] if i < len(logs) else {}
        per_step.append({
            "step": i + 1,
            "loss": log.get("loss"),
            "grad_norm": log.get("grad_norm"),
            "learning_rate": log.get("learning_rate"),
            "num_tokens": trainer.step_tokens[i] if i < len(trainer.step_tokens) else None,
            "num_loss_tokens": trainer.step_loss_tokens[i] if i < len(trainer.step_loss_tokens) else None,
            "step_seconds": t - prev,
            "elapsed_seconds": t - timer.t_first_begin,
        })
        prev = t
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "padding_free": padding_free,
        "precision": args.precision,
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
        "weights_dtype": str(next(model.parameters()).dtype),
        "packing_strategy": config.packing_strategy,
        "steps": steps,
        "train_seconds": train_seconds,
        "num_tokens": num_tokens,
        "num_loss_tokens": sum(trainer.step_loss_tokens),
        "tokens_per_second": num_tokens / train_seconds,
        "steady_tokens_per_second": steady,
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
