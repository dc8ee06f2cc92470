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


def reference_loss(model, docs: list[list[int]], masks: list[list[int]] | None = None) -> tuple[float, int]:
    """Token-mean next-token NLL of `docs`, each run alone (no packing) through `model`.
    masks[i][t] == 1: token t of doc i is a target (default: every token but the first)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i, doc in enumerate(docs):
            if len(doc) < 2:
                continue
            ids = torch.tensor([doc])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            m = torch.ones_like(nll) if masks is None else torch.tensor(masks[i][1:], dtype=nll.dtype)
            total += float((nll * m).sum())
            count += int(m.sum())
    return total / count, count


def posttrain_first_batch(data: str, model_dir: str, max_length: int, batch_size: int, seed: int):
    """(docs, completion masks) of posttrain's first optimizer step, rebuilt with posttrain's own
    data preparation and batch plan (private helpers of posttrain.recipes.sft: if they move,
    this raises and the benchmark reports the check as not done)."""
    from posttrain.config import SFTConfig
    from posttrain.engine.batching import BatchPlan
    from posttrain.models.loading import load_tokenizer
    from posttrain.recipes.sft import _build_units, _load_data

    config = SFTConfig(model_name_or_path=model_dir, dataset_name=data, max_length=max_length, packing=True,
                       per_device_train_batch_size=batch_size, seed=seed)
    tokenizer = load_tokenizer(model_dir)
    examples = _load_data(config, tokenizer, None, lambda *_: None)
    plan = BatchPlan(units=_build_units(examples, config), micro_batch_size=batch_size, accumulation=1,
                     world_size=1, seed=seed)
    chosen = [examples[i] for mb in plan.step_micro_batches(0, 0) for i in mb]
    return [e.input_ids for e in chosen], [list(e.completion_mask) for e in chosen]


def check(data: str, model_dir: str, trl_batch: str | None, max_length: int, batch_size: int, seed: int,
          trl_loss: float | None = None, posttrain_loss: float | None = None) -> dict:
    """Reference losses of each tool's first batch, with the initial model, next to the logged ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {}
    if trl_batch:
        with open(trl_batch) as fh:
            docs = json.load(fh)["docs"]
        ref, n = reference_loss(model, docs)  # TRL trains every token but each document's first
        out["trl"] = {"documents": len(docs), "targets": n, "reference_loss": ref, "logged_loss": trl_loss}
    docs, masks = posttrain_first_batch(data, model_dir, max_length, batch_size, seed)
    ref, n = reference_loss(model, docs, masks)
    ref_all, n_all = reference_loss(model, docs)
    out["posttrain"] = {"documents": len(docs), "targets": n, "reference_loss": ref, "logged_loss": posttrain_loss,
                        "reference_loss_every_token": ref_all, "targets_every_token": n_all}
    for side in out.values():
        logged = side["logged_loss"]
        side["rel_error"] = None if logged is None else (logged - side["reference_loss"]) / side["reference_loss"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--trl_batch", default=None, help="JSON from trl_sft_runner.py --dump_first_batch")
    ap.add_argument("--trl_loss", type=float, default=None, help="TRL's logged step-1 loss")
    ap.add_argument("--posttrain_loss", type=float, default=None, help="posttrain's logged step-1 loss")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.model_dir is None:
        from posttrain.models.default_model import default_model_dir

        args.model_dir = str(default_model_dir())
    result = check(args.data, args.model_dir, args.trl_batch, args.max_length, args.batch_size, args.seed,
                   args.trl_loss, args.posttrain_loss)
    for name, r in result.items():
        line = (f"{name:<10} first batch: {r['documents']} documents, {r['targets']} targets, "
                f"reference loss {r['reference_loss']:.4f}")
        if r["logged_loss"] is not None:
            line += f"; logged {r['logged_loss']:.4f} ({r['rel_error']:+.2%})"
        if "reference_loss_every_token" in r:
            line += (f"; on every token ({r['targets_every_token']} targets, as TRL would): "
                     f"{r['reference_loss_every_token']:.4f}")
        print(line)


if __name__ == "__main__":
    main()
