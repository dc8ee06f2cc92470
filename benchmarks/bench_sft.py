"""SFT benchmark: posttrain vs TRL's SFTTrainer on the same model, data and settings.

    make bench          # = bash benchmarks/setup_bench_env.sh && .venv/bin/python benchmarks/bench_sft.py
    .venv/bin/python benchmarks/bench_sft.py --steps 8 --max_length 512 --batch_size 2 [--only trl|posttrain]

1. writes the workload (benchmarks/workload.py, seeded) to benchmarks/.data/sft.jsonl,
2. runs TRL (benchmarks/trl_sft_runner.py, with .venv-bench/bin/python) in a fresh process,
3. runs posttrain (benchmarks/posttrain_sft_runner.py -> `posttrain sft`) in a fresh process,
4. prints both side by side with the ratios and the targets, and writes benchmarks/results/sft.json.

Peak memory is measured the same way for both (benchmarks/harness.py): each side runs in its own child process and
its peak RSS is read from os.wait4 on that child (the kernel's ru_maxrss, which covers the
child and any process it waited for). Every number printed is measured in this run; a side
that was not run (--only) is shown as "-" and no ratio is computed.
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

import workload  # noqa: E402
from harness import (  # noqa: E402
    BENCH_PYTHON,
    add_precision_args,
    default_model_dir,
    fmt,
    machine_peak,
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

TARGET_SPEEDUP = 3.0  # posttrain tokens/s >= 3x TRL's
TARGET_MEMORY = 0.35  # posttrain peak RSS <= 0.35x TRL's in the same precision (issue 11)
LOSS_TOLERANCE = 0.05  # step-0 losses should agree within 5 %


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps on each side")
    ap.add_argument("--max_length", type=int, default=512, help="packed row length in tokens")
    ap.add_argument("--batch_size", type=int, default=2, help="packed rows per step (per device)")
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rows", type=int, default=workload.DEFAULT_ROWS, help="rows in the generated dataset")
    ap.add_argument("--data_seed", type=int, default=workload.DEFAULT_SEED)
    add_precision_args(ap)
    ap.add_argument("--only", choices=["trl", "posttrain"], help="run one side only")
    ap.add_argument("--model_dir", default=None, help="default: posttrain's embedded SmolLM2-135M-Instruct")
    ap.add_argument("--bench_python", default=BENCH_PYTHON,
                    help="python of the venv that has TRL")
    ap.add_argument("--data_dir", default=str(HERE / ".data"))
    ap.add_argument("--results", default=None,
                    help="default: results/sft.json (fp32), results/sft-bf16[-ckpt].json, ...")
    ap.add_argument("--wait_quiet", type=float, default=300,
                    help="seconds to wait, before each side, for other processes to leave the CPUs idle")
    ap.add_argument("--skip_loss_check", action="store_true",
                    help="do not recompute the step-1 losses independently")
    ap.add_argument("--keep_outputs", action="store_true", help="keep both runs' output dirs")
    args = ap.parse_args()

    peak = machine_peak(args.peak_json)
    print_peak(peak)
    data_dir = Path(args.data_dir)
    data_path = workload.write_jsonl(data_dir / "sft.jsonl", rows=args.rows, seed=args.data_seed)
    args.model_dir = default_model_dir(args.model_dir)
    n_params = model_params(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    common = [
        "--data", str(data_path), "--model_dir", args.model_dir,
        "--steps", str(args.steps), "--max_length", str(args.max_length),
        "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed), "--precision", args.precision,
    ] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])

    sides: dict[str, dict] = {}
    plan = [s for s in ("trl", "posttrain") if args.only in (None, s)]
    for side in plan:
        out_json = work / f"{side}.json"
        if side == "trl":
            if not Path(args.bench_python).exists():
                print(f"{args.bench_python} missing: run `bash benchmarks/setup_bench_env.sh` first")
                return 2
            cmd = [args.bench_python, str(HERE / "trl_sft_runner.py")]
        else:
            cmd = [sys.executable, str(HERE / "posttrain_sft_runner.py")]
        cmd += common + ["--out", str(out_json), "--output_dir", str(work / f"{side}-run")]
        if side == "trl":
            cmd += ["--dump_first_batch", str(work / "trl_first_batch.json")]
        run = run_side(side, cmd, work / f"{side}.log", args.wait_quiet)
        if run["rc"] != 0:
            return run["rc"]
        res = json.loads(out_json.read_text())
        losses = [st["loss"] for st in res.get("per_step", []) if st.get("loss") is not None]
        res["mean_loss"] = sum(losses) / len(losses) if losses else None
        res["model_flops"] = model_flops(n_params, res.get("num_tokens") or 0)  # every input token trained
        res["mfu"] = mfu(res["model_flops"], res.get("train_seconds"), peak, args.precision)
        sides[side] = record_process(res, run)

    t, p = sides.get("trl"), sides.get("posttrain")

    # Correctness of the step-1 losses: recompute each tool's first-batch loss with the initial
    # model, unpacked, one document at a time (the tools shuffle and pack differently, so their
    # first batches differ and so do their raw step-1 losses).
    first_check = None
    if not args.skip_loss_check:
        import check_first_loss

        print("\n=== recomputing each side's step-1 loss on its own first batch (initial model, unpacked)")
        try:
            first_check = check_first_loss.check(
                str(data_path), args.model_dir, str(work / "trl_first_batch.json") if t else None,
                args.max_length, args.batch_size, args.seed,
                trl_loss=t["first_loss"] if t else None, posttrain_loss=p["first_loss"] if p else None)
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not lose the measured results
            print(f"    check not done: {type(exc).__name__}: {exc}")
        if first_check and not p:
            first_check.pop("posttrain", None)
        for side, r in (first_check or {}).items():
            sides[side]["first_loss_reference"] = r["reference_loss"]
            sides[side]["first_loss_reference_error"] = r["rel_error"]
            sides[side]["first_batch"] = r

    def ratio(key: str) -> float | None:
        return ratio_of(p, t, key)

    speedup = ratio("tokens_per_second")
    steady_speedup = ratio("steady_tokens_per_second")
    mem_ratio = ratio("peak_rss_kib_wait4")
    loss_diff = None
    if t and p and t.get("first_loss") and p.get("first_loss") is not None:
        loss_diff = abs(p["first_loss"] - t["first_loss"]) / t["first_loss"]

    rows = [
        ("optimizer steps", "steps", "d"),
        ("input tokens (no padding)", "num_tokens", "d"),
        ("tokens with a loss", "num_loss_tokens", "d"),
        ("train seconds (step 1 start..last end)", "train_seconds", ".1f"),
        ("tokens / s", "tokens_per_second", ".1f"),
        ("tokens / s, steps 2..N", "steady_tokens_per_second", ".1f"),
        ("peak RSS (GiB)", "peak_rss_gib", ".2f"),
        (f"MFU = 6N x tokens / s / {args.precision} peak", "mfu", ".1%"),
        ("first loss (step 1, as logged)", "first_loss", ".4f"),
        ("step-1 loss recomputed on the same batch", "first_loss_reference", ".4f"),
        ("last loss", "last_loss", ".4f"),
        ("mean loss over the steps", "mean_loss", ".4f"),
        ("process wall seconds (incl. load/save)", "wall_seconds_with_startup", ".1f"),
        ("process CPU seconds (incl. load/save)", "process_cpu_seconds", ".1f"),
        ("cores used by other processes (contention)", "other_cores_busy_during", ".2f"),
    ]
    title = (f"SFT benchmark - SmolLM2-135M-Instruct ({n_params / 1e6:.1f}M), "
             f"{precision_label(args.precision, args.gradient_checkpointing)} on both, CPU x{os.cpu_count()}, "
             f"{args.steps} steps, batch {args.batch_size} x packed {args.max_length}, lr {args.learning_rate}, "
             f"seed {args.seed}")
    header = ("", "TRL SFTTrainer", "posttrain sft", "posttrain / TRL")
    table = []
    for label, key, spec in rows:
        r = ratio(key) if key not in ("steps", "first_loss", "first_loss_reference", "last_loss", "mean_loss",
                                          "other_cores_busy_during", "mfu") else None
        table.append([label, fmt(t.get(key) if t else None, spec), fmt(p.get(key) if p else None, spec),
                      fmt(r, ".2f") + ("x" if r is not None else "")])

    def check(value, ok) -> str:
        return verdict(None if value is None else ok(value))

    targets = [
        (f"tokens/s >= {TARGET_SPEEDUP:g}x TRL", fmt(speedup, ".2f") + "x",
         check(speedup, lambda v: v >= TARGET_SPEEDUP)),
        (f"peak memory <= {TARGET_MEMORY:g}x TRL", fmt(mem_ratio, ".2f") + "x",
         check(mem_ratio, lambda v: v <= TARGET_MEMORY)),
        (f"step-1 losses agree within {LOSS_TOLERANCE:.0%} (different batches!)", fmt(loss_diff, ".1%"),
         check(loss_diff, lambda v: v <= LOSS_TOLERANCE)),
    ]
    for side, label in (("trl", "TRL"), ("posttrain", "posttrain")):
        err = sides.get(side, {}).get("first_loss_reference_error")
        if err is not None:
            # the recomputation is fp32: in a bf16 row the gap includes bf16 autocast's rounding
            how = "fp32 recomputation of a bf16 run" if args.precision == "bf16" else "recomputation"
            targets.append((f"{label} step-1 loss = {how} (0.5%)", f"{err:+.2%}",
                            check(abs(err), lambda v: v <= 0.005)))
    print_tables(title, list(header), table, targets, width=110)
    warn_contention([t, p])

    result = {
        **result_header("sft", command=True, peak=peak),
        "config": {
            "model_dir": args.model_dir, "dtype": "float32", "precision": args.precision,
            "n_params": n_params, "mfu_formula": "6 * n_params * input tokens / train seconds / peak", "steps": args.steps, "max_length": args.max_length,
            "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
            "learning_rate": args.learning_rate, "lr_scheduler": "linear, no warmup", "seed": args.seed,
            "packing": "bfd, padding-free", "loss": "full sequence (messages, no assistant-only mask)",
            "gradient_checkpointing": args.gradient_checkpointing, "data_rows": args.rows,
            "data_seed": args.data_seed,
        },
        "trl": t,
        "posttrain": p,
        "ratios": {"tokens_per_second": speedup, "steady_tokens_per_second": steady_speedup,
                   "peak_rss": mem_ratio, "first_loss_rel_diff": loss_diff},
        "first_batch_check": first_check,
        "targets": {"tokens_per_second_ratio_min": TARGET_SPEEDUP, "peak_rss_ratio_max": TARGET_MEMORY,
                    "speed_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
                    "memory_met": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY},
    }
    results_file = write_results(args.results or results_path("sft", args.precision, args.gradient_checkpointing),
                                 result)
    print(f"\nresults: {results_file}\nlogs: {work}/*.log")
    if not args.keep_outputs:
        for side in plan:
            shutil.rmtree(work / f"{side}-run", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
