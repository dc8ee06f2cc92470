"""`posttrain demo` (what `make demo` runs): the full RLHF pipeline on the embedded
SmolLM2-135M-Instruct with bundled, verifiable arithmetic data — demo/pipeline.yaml, run by
`posttrain pipeline` — then a before/after table on held-out prompts no stage trained on: exact
task accuracy, the exact judge's win rate over the start model, and the KL to the start model.

`posttrain demo --quick` runs the same pipeline on a tiny random model built here (offline) with a
few steps per stage: every stage exercised in about a minute, no gain expected.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).parent
PIPELINE_FILE = DEMO_DIR / "pipeline.yaml"
# --quick: every stage, a few steps, short completions, a few held-out prompts.
QUICK_OVERRIDES = {"max_steps": 3, "max_completion_length": 8, "num_generations": 2, "per_device_train_batch_size": 4,
                   "max_eval_samples": 8, "num_samples": 1, "save_steps": 0, "eval_split_ratio": 0.0}


@dataclass
class DemoArgs:
    output_dir: str | None = field(default=None, metadata={"help": "Default runs/demo (runs/demo-quick with --quick)."})
    quick: bool = field(default=False, metadata={"help": "The same pipeline on a tiny random model, in about a minute."})
    force: str | None = field(default=None, metadata={"help": "Rerun this stage and every later one."})


def build_tiny_model(out_dir: Path) -> Path:
    """A tiny random-initialised Llama with SmolLM2's tokenizer and chat template (offline: the
    tokenizer comes from the embedded default), saved once as a model dir."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def quick_spec(spec: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """The demo pipeline on `model_dir` with QUICK_OVERRIDES applied wherever a stage has the key."""
    spec = copy.deepcopy(spec)
    spec.setdefault("defaults", {})["model_name_or_path"] = str(model_dir)
    spec["defaults"]["disable_tqdm"] = True
    for stage in spec["stages"].values():
        for key, value in QUICK_OVERRIDES.items():
            if key in stage:
                stage[key] = value
        if stage.get("command") == "eval":
            stage["max_eval_samples"] = QUICK_OVERRIDES["max_eval_samples"]
            stage["num_samples"] = QUICK_OVERRIDES["num_samples"]
    return spec


def _lineage(plans, name: str) -> list[str]:
    """Stage names from the first training stage to `name`, following `model` references."""
    by_name = {p.stage.name: p.stage for p in plans}
    chain = []
    while name in by_name:
        chain.append(name)
        name = by_name[name].references.get("model_name_or_path")
    return chain[::-1]


def results_table(result) -> tuple[list[dict[str, Any]], str]:
    """One row per eval stage (model vs the start) plus the start itself, from their eval.json."""
    rows: list[dict[str, Any]] = []
    for plan in result.plans:
        if plan.stage.command != "eval":
            continue
        record = json.loads((plan.stage.output_dir / "eval.json").read_text())
        model, base, comp = record["metrics"]["model"], record["metrics"].get("baseline", {}), record["comparison"]
        if not rows:
            rows.append({"name": "start (before training)", "accuracy": base.get("greedy/accuracy"),
                         "reward": base.get("greedy/reward"), "win_rate": None, "kl": None,
                         "prompts": record["num_prompts"]})
        trained = plan.stage.references.get("model_name_or_path", plan.stage.name)
        rows.append({"name": " → ".join(_lineage(result.plans, trained)), "stage": plan.stage.name,
                     "accuracy": model.get("greedy/accuracy"), "reward": model.get("greedy/reward"),
                     "win_rate": comp.get("greedy/win_rate_judge", comp.get("greedy/win_rate")),
                     "kl": comp.get("sampled/kl_k1"), "prompts": record["num_prompts"]})

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [f"held-out prompts: {rows[0]['prompts'] if rows else 0} (in no training file)",
             f"  {'model':<{width}}  {'accuracy':>9}  {'judge win rate':>14}  {'KL to start':>11}  {'RM reward':>9}"]
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {pct(r['accuracy']):>9}  {num(r['win_rate'], '.2f'):>14}  "
                     f"{num(r['kl'], '.2f'):>11}  {num(r['reward'], '.2f'):>9}")
    lines.append("  accuracy: greedy answer exactly right in the `#### N` form; judge: exact answer check, "
                 "P(better than start), 0.5 = tie; KL: nats per sampled completion")
    return rows, "\n".join(lines)


def main(argv: list[str]) -> int:
    import yaml

    from posttrain.commands import parse_config
    from posttrain.pipeline import run_pipeline

    args = parse_config(DemoArgs, argv, prog="posttrain demo")
    output_dir = Path(args.output_dir or ("runs/demo-quick" if args.quick else "runs/demo"))
    spec = yaml.safe_load(PIPELINE_FILE.read_text())
    if args.quick:
        spec = quick_spec(spec, build_tiny_model(output_dir / "tiny-model"))
    started = time.time()
    result = run_pipeline(spec, base_dir=DEMO_DIR, output_dir=output_dir, force=args.force)
    if result.stopped_at:
        return 130
    took = time.time() - started
    rows, table = results_table(result)
    (output_dir / "demo_result.json").write_text(json.dumps(
        {"quick": args.quick, "seconds": round(took, 1), "rows": rows,
         "report": str(result.report_path) if result.report_path else None}, indent=2))
    print()
    print("posttrain demo --quick (tiny random model: a smoke test, no gain expected)" if args.quick else
           "posttrain demo: SmolLM2-135M-Instruct, sft → reward → grpo and sft → dpo")
    print(table)
    print(f"took {took:.0f} s; stages in {output_dir}/<stage>/ (HF model dirs, metrics.jsonl, eval.json); "
          f"numbers in {output_dir / 'demo_result.json'}")
    if result.report_path:
        print(f"report: {result.report_path}")
    return 0
