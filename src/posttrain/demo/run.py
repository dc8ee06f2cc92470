"""`posttrain demo` (what `make demo` runs): fine-tune the embedded SmolLM2-135M-Instruct on the
bundled arithmetic task and measure held-out accuracy before and after, by exact answer check."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.demo.tasks import DATA_DIR, check_answer


@dataclass
class DemoArgs:
    output_dir: str = "runs/demo"
    max_steps: int = 40
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = 8
    eval_prompts: int = 64


def greedy_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32,
                       batch_size: int = 16) -> list[str]:
    """Greedy replies to chat prompts (left-padded batches, decoded without special tokens)."""
    import torch

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer.apply_chat_template(prompts[i:i + batch_size], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True, padding=True)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(model, tokenizer, rows: list[dict]) -> tuple[float, list[str]]:
    replies = greedy_completions(model, tokenizer, [r["prompt"] for r in rows])
    return sum(check_answer(c, r["answer"]) for c, r in zip(replies, rows)) / len(rows), replies


def main(argv: list[str]) -> int:
    from posttrain.cli import parse_config
    from posttrain.config import SFTConfig
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.recipes.sft import sft

    args = parse_config(DemoArgs, argv, prog="posttrain demo")
    rows = [json.loads(line) for line in (DATA_DIR / "eval_prompts.jsonl").read_text().splitlines()]
    rows = rows[: args.eval_prompts]
    t0 = time.time()
    tokenizer = load_tokenizer(None)
    base = load_causal_lm(None)
    before, before_replies = accuracy(base, tokenizer, rows)
    print(f"held-out accuracy before: {before:.1%} ({len(rows)} prompts never seen in training)")
    config = SFTConfig(dataset_name=str(DATA_DIR / "sft_train.jsonl"), output_dir=args.output_dir,
                       max_steps=args.max_steps, learning_rate=args.learning_rate,
                       per_device_train_batch_size=args.per_device_train_batch_size, logging_steps=5,
                       save_steps=0, warmup_ratio=0.1, lr_scheduler_type="cosine", max_length=256,
                       assistant_only_loss=True)
    result = sft(config, model=base, tokenizer=tokenizer)
    after, after_replies = accuracy(result.model, tokenizer, rows)
    took = time.time() - t0
    print()
    print(f"{'':24}{'before':>10}{'after':>10}")
    print(f"{'held-out accuracy':24}{before:>10.1%}{after:>10.1%}")
    print(f"example prompt: {rows[0]['prompt'][0]['content']}")
    print(f"  before: {before_replies[0]!r}")
    print(f"  after:  {after_replies[0]!r}")
    print(f"model saved to {result.output_dir} (loads with AutoModelForCausalLM.from_pretrained); "
          f"metrics: {result.output_dir / 'metrics.jsonl'}; total {took:.0f} s")
    Path(args.output_dir, "demo_result.json").write_text(json.dumps(
        {"accuracy_before": before, "accuracy_after": after, "eval_prompts": len(rows), "seconds": took}, indent=2))
    return 0
