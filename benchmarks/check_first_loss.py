"""Are the two tools' step-1 losses right? Recompute them independently.

The tools pack and shuffle differently, so their first optimizer steps see different documents
and their step-1 losses differ by the batches' difficulty, not only by any bug. This script
recomputes, with the initial model and a plain unpacked transformers forward (one document at a
time, full-sequence next-token loss, token-mean over the batch), the loss of

- TRL's first batch (dumped by `trl_sft_runner.py --dump_first_batch`), and
- posttrain's first batch (rebuilt with posttrain's own data preparation and batch plan),

and prints them next to the step-1 losses the tools logged. Each tool is right when its logged
loss matches the reference on its own batch; the two batches' references show how much of the
gap is data.

    .venv/bin/python benchmarks/check_first_loss.py --data benchmarks/.data/sft.jsonl \
        --trl_batch /tmp/trl_first_batch.json --trl_loss 4.29 --posttrain_loss 4.79
"""

from __future__ import annotations

import argparse
import json

import torch


def reference_loss(model, docs: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            if len(doc) < 2:
                continue
            ids = torch.tensor([doc])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += len(doc) - 1
    return total / count, count


def posttrain_first_batch(data: str, model_dir: str, max_length: int, batch_size: int, seed: int):
    from posttrain.config import SFTConfig
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.engine.batching import BatchPlan
    from posttrain.models.loading import load_tokenizer
    from posttrain.recipes.sft import _build_units, _load_data

    config = SFTConfig(model_name_or_path=model_dir, dataset_name=data, max_length=max_length, packing=True,
                       per_device_train_batch_size=batch_size, seed=seed)
    tokenizer = load_tokenizer(model_dir)
    del as_loaded_rows  # _load_data does the loading
    examples = _load_data(config, tokenizer, None, lambda *_: None)
    plan = BatchPlan(units=_build_units(examples, config), micro_batch_size=batch_size, accumulation=1,
                     world_size=1, seed=seed)
    return [examples[i].input_ids for mb in plan.step_micro_batches(0, 0) for i in mb]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--trl_batch", required=True, help="JSON from trl_sft_runner.py --dump_first_batch")
    ap.add_argument("--trl_loss", type=float, default=None, help="TRL's logged step-1 loss")
    ap.add_argument("--posttrain_loss", type=float, default=None, help="posttrain's logged step-1 loss")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    if args.model_dir is None:
        from posttrain.models.default_model import default_model_dir

        args.model_dir = str(default_model_dir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with open(args.trl_batch) as fh:
        trl_docs = json.load(fh)["docs"]
    pt_docs = posttrain_first_batch(args.data, args.model_dir, args.max_length, args.batch_size, args.seed)
    for name, docs, logged in (("TRL", trl_docs, args.trl_loss), ("posttrain", pt_docs, args.posttrain_loss)):
        ref, n = reference_loss(model, docs)
        line = f"{name:<10} first batch: {len(docs)} documents, {n} target tokens, reference loss {ref:.4f}"
        if logged is not None:
            line += f"; logged {logged:.4f} ({(logged - ref) / ref:+.2%})"
        print(line)


if __name__ == "__main__":
    main()
