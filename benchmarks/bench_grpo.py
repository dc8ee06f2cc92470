"""GRPO benchmark: posttrain grpo vs TRL's GRPOTrainer on the same prompts, model, reward and settings.

    .venv/bin/python benchmarks/bench_grpo.py                      # defaults below
    .venv/bin/python benchmarks/bench_grpo.py --steps 6 --num_generations 8 --max_completion_length 64
    .venv/bin/python benchmarks/bench_grpo.py --repeats 2          # sides interleaved, each side's fastest run shown

1. writes the workload - arithmetic prompts with their answers from posttrain.demo.tasks (seeded,
   conversational `prompt` + `answer`) - to benchmarks/.data/grpo.jsonl,
2. runs TRL (benchmarks/trl_grpo_runner.py, .venv-bench) and posttrain
   (benchmarks/posttrain_grpo_runner.py -> `posttrain grpo`), each in a fresh process, alternating
   when --repeats > 1 so that both see the same machine load,
3. prints completions/s, completion tokens/s, peak RSS and mean reward for both with the ratios
   and the target, and writes benchmarks/results/grpo.json.

Both sides: the embedded SmolLM2-135M-Instruct with fp32 weights on CPU, in the same precision
(--precision fp32 or bf16 autocast) and gradient checkpointing setting, the reward function of
benchmarks/grpo_reward.py, the same group size, completion length, temperature, prompts per step,
steps, lr, beta (0: no reference model), loss_type dapo, group-scaled rewards, one iteration per
rollout, one step's completions generated at once, no vLLM.
Peak RSS, the quiet-machine wait and the contention figure come from harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    BENCH_PYTHON,
    add_precision_args,
    default_model_dir,
    fmt,
    fmtx,
    machine_peak,
    median,
    mfu,
    model_flops,
    model_params,
    precision_label,
    print_peak,
    print_tables,
    record_process,
    result_header,
    results_path,
    run_side,
    verdict,
    warn_contention,
    write_results,
)
from harness import ratio as ratio_of  # noqa: E402

TARGET_SPEEDUP = 2.5  # posttrain completions/s >= 2.5x TRL's in the same precision (issue 11)
LABELS = {"trl": "TRL GRPOTrainer", "posttrain": "posttrain grpo"}


def write_prompts(path: Path, n: int, seed: int) -> Path:
    """Seeded arithmetic prompts (conversational) with their answers, one JSON object a line."""
    from posttrain.demo.tasks import generate

    _, rows = generate(seed=seed, n_train=0, n_eval=n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    return path


def summarise(res: dict) -> dict:
    """The figures compared, from a runner's per-step record (the same arithmetic for both sides)."""
    steps = res["per_step"]
    completions = sum(st["completions"] for st in steps)
    tokens = sum(st["completions"] * (st.get("completions/mean_length") or 0.0) for st in steps)
    rewards = [st["reward"] for st in steps if st.get("reward") is not None]
    res["completions"] = completions
    res["completion_tokens"] = tokens
    res["completions_per_second"] = completions / res["train_seconds"]
    res["completion_tokens_per_second"] = tokens / res["train_seconds"]
    if len(steps) >= 2:
        later = sum(st["step_seconds"] for st in steps[1:])
        res["steady_completions_per_second"] = sum(st["completions"] for st in steps[1:]) / later
    res["mean_completion_length"] = tokens / completions if completions else None
    res["mean_reward"] = sum(rewards) / len(rewards) if rewards else None
    res["median_step_seconds"] = median(st["step_seconds"] for st in steps)
    res["fastest_step_seconds"] = min(st["step_seconds"] for st in steps)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (one rollout each) on each side")
    ap.add_argument("--prompts_per_step", type=int, default=2)
    ap.add_argument("--num_generations", type=int, default=8, help="group size G")
    ap.add_argument("--max_completion_length", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (0: no reference model on either side)")
    ap.add_argument("--loss_type", default="dapo")
    ap.add_argument("--scale_rewards", default="group")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prompts", type=int, default=64, help="prompts in the generated dataset")
    ap.add_argument("--data_seed", type=int, default=2024)
    ap.add_argument("--only", choices=["trl", "posttrain"])
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every side this many times, interleaved; each side's fastest run is reported")
    ap.add_argument("--model_dir", default=None, help="default: posttrain's embedded SmolLM2-135M-Instruct")
    ap.add_argument("--bench_python", default=BENCH_PYTHON)
    ap.add_argument("--data_dir", default=str(HERE / ".data"))
    ap.add_argument("--results", default=None,
                    help="default: results/grpo.json (fp32), results/grpo-bf16[-ckpt].json, ...")
    add_precision_args(ap)
    ap.add_argument("--wait_quiet", type=float, default=300)
    ap.add_argument("--keep_outputs", action="store_true")
    args = ap.parse_args()

    peak = machine_peak(args.peak_json)
    print_peak(peak)
    data_path = write_prompts(Path(args.data_dir) / "grpo.jsonl", args.prompts, args.data_seed)
    args.model_dir = default_model_dir(args.model_dir)
    n_params = model_params(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    common = ["--data", str(data_path), "--model_dir", args.model_dir, "--steps", str(args.steps),
              "--prompts_per_step", str(args.prompts_per_step), "--num_generations", str(args.num_generations),
              "--max_completion_length", str(args.max_completion_length), "--temperature", str(args.temperature),
              "--learning_rate", str(args.learning_rate), "--beta", str(args.beta), "--loss_type", args.loss_type,
              "--scale_rewards", args.scale_rewards, "--seed", str(args.seed), "--precision", args.precision]
    if args.gradient_checkpointing:
        common.append("--gradient_checkpointing")
    plan = []
    if args.only in (None, "trl"):
        if not Path(args.bench_python).exists():
            print(f"{args.bench_python} missing: run `bash benchmarks/setup_bench_env.sh` first")
            return 2
        plan.append(("trl", [args.bench_python, str(HERE / "trl_grpo_runner.py")]))
    if args.only in (None, "posttrain"):
        plan.append(("posttrain", [sys.executable, str(HERE / "posttrain_grpo_runner.py")]))

    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for name, cmd in plan if rep % 2 == 0 else plan[::-1]:  # alternate who goes first
            tag = name if args.repeats == 1 else f"{name}-{rep + 1}"
            out_json = work / f"{tag}.json"
            run = run_side(tag, cmd + common + ["--out", str(out_json), "--output_dir", str(work / f"{tag}-run")],
                           work / f"{tag}.log", args.wait_quiet)
            if run["rc"] != 0:
                return run["rc"]
            res = summarise(record_process(json.loads(out_json.read_text()), run))
            # each completion token: generated (forward, 2N) and trained (6N); prompt tokens not counted
            res["model_flops"] = model_flops(n_params, res["completion_tokens"], res["completion_tokens"])
            res["mfu"] = mfu(res["model_flops"], res["train_seconds"], peak, args.precision)
            res["mfu_training_only"] = mfu(model_flops(n_params, res["completion_tokens"]), res["train_seconds"],
                                           peak, args.precision)
            runs.setdefault(name, []).append(res)
            if not args.keep_outputs:
                shutil.rmtree(work / f"{tag}-run", ignore_errors=True)
    sides = {name: min(rs, key=lambda r: r["train_seconds"]) for name, rs in runs.items()}
    for name, rs in runs.items():
        sides[name]["runs_completions_per_second"] = [r["completions_per_second"] for r in rs]
    t, p = sides.get("trl"), sides.get("posttrain")

    rows = [("optimizer steps", "steps", "d", False), ("completions (prompts x G x steps)", "completions", "d", False),
            ("completion tokens generated", "completion_tokens", ".0f", True),
            ("mean completion length", "mean_completion_length", ".1f", True),
            ("train seconds (step 1 start..last end)", "train_seconds", ".1f", True),
            ("completions / s", "completions_per_second", ".3f", True),
            ("completions / s, steps 2..N", "steady_completions_per_second", ".3f", True),
            ("completion tokens / s", "completion_tokens_per_second", ".1f", True),
            ("median step seconds", "median_step_seconds", ".2f", True),
            ("fastest step seconds", "fastest_step_seconds", ".2f", True),
            ("peak RSS (GiB)", "peak_rss_gib", ".2f", True),
            (f"MFU = (2N gen + 6N train) x completion tokens / s / {args.precision} peak", "mfu", ".1%", False),
            ("  of which training (6N)", "mfu_training_only", ".1%", False),
            ("mean reward over the steps", "mean_reward", ".3f", False),
            ("process wall seconds (incl. load/save)", "wall_seconds_with_startup", ".1f", True),
            ("cores used by other processes", "other_cores_busy_during", ".2f", False)]
    names = [n for n, _ in plan]
    header = [""] + [LABELS[n] for n in names] + (["posttrain / TRL"] if t and p else [])
    table = []
    for label, key, spec, with_ratio in rows:
        cells = [label] + [fmt(sides[n].get(key), spec) for n in names]
        if t and p:
            r = ratio_of(p, t, key) if with_ratio else None
            cells.append("" if r is None else fmtx(r))
        table.append(cells)
    speed, mem = ratio_of(p, t, "completions_per_second"), ratio_of(p, t, "peak_rss_kib_wait4")
    speed_ok = None if speed is None else speed >= TARGET_SPEEDUP
    targets = [(f"completions/s >= {TARGET_SPEEDUP:g}x TRL (CPU)", fmtx(speed), verdict(speed_ok)),
               ("peak RSS (no target; for the record)", fmtx(mem), ""),
               ("mean reward (different samples; no target)",
                f"{fmt(t and t.get('mean_reward'), '.3f')} vs {fmt(p and p.get('mean_reward'), '.3f')}", "")]
    title = (f"GRPO benchmark - SmolLM2-135M-Instruct, {precision_label(args.precision, args.gradient_checkpointing)} "
             f"on both, CPU x{os.cpu_count()}, {args.steps} steps x "
             f"{args.prompts_per_step} prompts x G={args.num_generations}, max_completion_length "
             f"{args.max_completion_length}, temperature {args.temperature}, beta {args.beta}, {args.loss_type}, "
             f"lr {args.learning_rate}, seed {args.seed}")
    print_tables(title, header, table, targets, width=120)
    warn_contention(sides.values())

    result = {
        **result_header("grpo", command=True, peak=peak),
        "config": {"model_dir": args.model_dir, "dtype": "float32", "precision": args.precision, "steps": args.steps,
                   "n_params": n_params,
                   "mfu_formula": "(2 * n_params (generation) + 6 * n_params (training)) * completion tokens "
                                  "/ train seconds / peak; prompt tokens not counted (a lower bound)",
                   "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
                   "completions_per_step": args.prompts_per_step * args.num_generations,
                   "max_completion_length": args.max_completion_length, "temperature": args.temperature,
                   "top_p": 1.0, "top_k": 0, "learning_rate": args.learning_rate, "lr_scheduler": "linear, no warmup",
                   "beta": args.beta, "loss_type": args.loss_type, "scale_rewards": args.scale_rewards,
                   "num_iterations": 1, "epsilon": 0.2, "gradient_accumulation_steps": 1,
                   "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.precision == "bf16",
                   "vllm": False, "seed": args.seed,
                   "reward": "benchmarks/grpo_reward.py:arithmetic_reward",
                   "data": f"posttrain.demo.tasks.generate(seed={args.data_seed}, n_train=0, n_eval={args.prompts})",
                   "repeats": args.repeats},
        **sides,
        "ratios": {"completions_per_second": speed, "peak_rss": mem,
                   "steady_completions_per_second": ratio_of(p, t, "steady_completions_per_second"),
                   "completion_tokens_per_second": ratio_of(p, t, "completion_tokens_per_second")},
        "targets": {"completions_per_second_ratio_min": TARGET_SPEEDUP, "speed_met": speed_ok},
        "table": {"header": header, "rows": table},
    }
    results_file = write_results(args.results or results_path("grpo", args.precision, args.gradient_checkpointing),
                                 result)
    print(f"\nresults: {results_file}\nlogs: {work}/*.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
