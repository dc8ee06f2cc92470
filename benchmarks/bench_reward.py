"""Reward-model benchmark: posttrain reward vs TRL's RewardTrainer on the same model, data and settings.

    .venv/bin/python benchmarks/bench_reward.py                       # defaults below
    .venv/bin/python benchmarks/bench_reward.py --steps 8 --batch_size 8 --max_length 512 [--only trl|posttrain]

1. writes the workload — `posttrain.demo.tasks.generate_preferences` pairs (prompt / chosen /
   rejected, conversational) — to benchmarks/.data/reward.jsonl,
2. runs TRL (benchmarks/trl_reward_runner.py, with .venv-bench/bin/python) in a fresh process,
3. runs `posttrain reward` padded (as TRL) and, unless --no_padding_free, padding-free
   (benchmarks/posttrain_reward_runner.py), each in a fresh process,
4. prints pairs/s, peak RSS, first/last loss side by side with the ratios to TRL and writes
   benchmarks/results/reward.json.

Peak RSS, the quiet-machine wait and the contention figure come from harness.py's `run_side`
(os.wait4 on each side's child). Every number printed is measured in this run.
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    BENCH_PYTHON,
    default_model_dir,
    fmt,
    median,
    print_tables,
    record_process,
    result_header,
    run_side,
    warn_contention,
    write_results,
)
from harness import ratio as ratio_of  # noqa: E402

DEFAULT_PAIRS = 512
DEFAULT_DATA_SEED = 4321


def write_workload(path: Path, pairs: int, seed: int) -> Path:
    from posttrain.demo.tasks import generate_preferences

    rows, _ = generate_preferences(seed=seed, n_train=pairs, n_eval=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:  # the three columns both tools read (no 'answer')
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step (per device)")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--learning_rate", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="pairs in the generated dataset")
    ap.add_argument("--data_seed", type=int, default=DEFAULT_DATA_SEED)
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--only", choices=["trl", "posttrain"])
    ap.add_argument("--no_padding_free", action="store_true", help="skip the padding-free posttrain run")
    ap.add_argument("--model_dir", default=None, help="default: posttrain's embedded SmolLM2-135M-Instruct")
    ap.add_argument("--bench_python", default=BENCH_PYTHON)
    ap.add_argument("--data_dir", default=str(HERE / ".data"))
    ap.add_argument("--results", default=str(HERE / "results" / "reward.json"))
    ap.add_argument("--wait_quiet", type=float, default=300)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every side this many times, interleaved; each side's fastest run is reported")
    ap.add_argument("--keep_outputs", action="store_true")
    args = ap.parse_args()

    data_path = write_workload(Path(args.data_dir) / "reward.jsonl", args.pairs, args.data_seed)
    args.model_dir = default_model_dir(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-reward-"))
    common = ["--data", str(data_path), "--model_dir", args.model_dir, "--steps", str(args.steps),
              "--max_length", str(args.max_length), "--batch_size", str(args.batch_size),
              "--learning_rate", str(args.learning_rate), "--seed", str(args.seed)]
    common += ["--gradient_checkpointing"] if args.gradient_checkpointing else []

    plan = []
    if args.only in (None, "trl"):
        plan.append(("trl", [args.bench_python, str(HERE / "trl_reward_runner.py")]))
    if args.only in (None, "posttrain"):
        plan.append(("posttrain", [sys.executable, str(HERE / "posttrain_reward_runner.py")]))
        if not args.no_padding_free:
            plan.append(("posttrain_padding_free", [sys.executable, str(HERE / "posttrain_reward_runner.py"),
                                                    "--padding_free"]))
    if any(name == "trl" for name, _ in plan) and not Path(args.bench_python).exists():
        print(f"{args.bench_python} missing: run `bash benchmarks/setup_bench_env.sh` first")
        return 2
    sides: dict[str, dict] = {}
    all_runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for name, cmd in plan:
            tag = name if args.repeats == 1 else f"{name}-{rep + 1}"
            out_json = work / f"{tag}.json"
            cmd = cmd + common + ["--out", str(out_json), "--output_dir", str(work / f"{tag}-run")]
            run = run_side(tag, cmd, work / f"{tag}.log", args.wait_quiet)
            if run["rc"] != 0:
                return run["rc"]
            res = record_process(json.loads(out_json.read_text()), run)
            # contention-robust step times (a busy core stalls a whole OpenMP team: a few steps can take 5x)
            times = [st["step_seconds"] for st in res["per_step"]]
            res["median_step_seconds"] = median(times)
            res["fastest_step_seconds"] = min(times)
            all_runs.setdefault(name, []).append(res)
            if args.keep_outputs is False:
                shutil.rmtree(work / f"{tag}-run", ignore_errors=True)
    for name, runs in all_runs.items():
        sides[name] = min(runs, key=lambda r: r["train_seconds"])
        sides[name]["runs_train_seconds"] = [r["train_seconds"] for r in runs]

    t = sides.get("trl")

    def ratio(side: dict | None, key: str) -> float | None:
        return ratio_of(side, t, key)

    rows = [("optimizer steps", "steps", "d", False), ("pairs trained", "pairs", "d", False),
            ("real tokens (no padding)", "num_tokens", "d", True),
            ("train seconds (step 1 start..last end)", "train_seconds", ".1f", True),
            ("pairs / s", "pairs_per_second", ".2f", True), ("pairs / s, steps 2..N", "steady_pairs_per_second", ".2f", True),
            ("real tokens / s", "tokens_per_second", ".1f", True),
            ("median step seconds", "median_step_seconds", ".2f", True),
            ("fastest step seconds", "fastest_step_seconds", ".2f", True), ("peak RSS (GiB)", "peak_rss_gib", ".2f", True),
            ("first loss (step 1)", "first_loss", ".4f", False), ("last loss", "last_loss", ".4f", False),
            ("process wall seconds (incl. load/save)", "wall_seconds_with_startup", ".1f", True),
            ("cores used by other processes", "other_cores_busy_during", ".2f", False)]
    names = [n for n, _ in plan]
    labels = {"trl": "TRL RewardTrainer", "posttrain": "posttrain reward", "posttrain_padding_free": "posttrain --padding_free"}
    header = [""] + [labels[n] for n in names] + [f"{labels[n]} / TRL" for n in names if n != "trl" and t]
    table = []
    for label, key, spec, with_ratio in rows:
        cells = [label] + [fmt(sides[n].get(key), spec) for n in names]
        for n in names:
            if n != "trl" and t:
                r = ratio(sides[n], key) if with_ratio else None
                cells.append(fmt(r, ".2f") + ("x" if r is not None else ""))
        table.append(cells)
    title = (f"Reward benchmark - SmolLM2-135M-Instruct fp32, CPU x{os.cpu_count()}, {args.steps} steps x "
             f"{args.batch_size} pairs, max_length {args.max_length}, lr {args.learning_rate}, seed {args.seed}")
    print_tables(title, header, table, plain=True)
    warn_contention(sides.values())

    result = {
        **result_header("reward"),
        "config": {"model_dir": args.model_dir, "dtype": "float32", "steps": args.steps,
                   "pairs_per_step": args.batch_size, "max_length": args.max_length,
                   "learning_rate": args.learning_rate, "lr_scheduler": "linear, no warmup", "seed": args.seed,
                   "gradient_checkpointing": args.gradient_checkpointing, "data_pairs": args.pairs,
                   "data_seed": args.data_seed, "data": "posttrain.demo.tasks.generate_preferences",
                   "repeats": args.repeats},
        **sides,
        "ratios_to_trl": {n: {k: ratio(sides[n], k) for k in ("pairs_per_second", "steady_pairs_per_second",
                                                              "tokens_per_second", "peak_rss_kib_wait4")}
                          for n in names if n != "trl"} if t else None,
        "table": {"header": header, "rows": table},
    }
    results_path = write_results(args.results, result)
    print(f"\nresults: {results_path}\nlogs: {work}/*.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
