"""`make bench`: SFT, DPO and GRPO, posttrain vs TRL, in each precision, with MFU, in one table.

    .venv/bin/python benchmarks/bench_all.py                                  # fp32 and bf16, sizes: auto
    .venv/bin/python benchmarks/bench_all.py --configs fp32,bf16,bf16+ckpt    # + TRL's own defaults
    .venv/bin/python benchmarks/bench_all.py --quick --wait_quiet 0           # smoke run: tiny sizes
    .venv/bin/python benchmarks/bench_all.py --methods sft --configs bf16 --sizes full

1. measures this machine's matmul peak once (fp32 and bf16 GFLOP/s, the CPU's bf16 capability;
   harness.measure_matmul_peak), prints it and passes it to every benchmark (--peak_json),
2. runs benchmarks/bench_<method>.py for each config (a precision, and gradient checkpointing on
   or off, the same on both sides: posttrain `--dtype float32 --bf16 true|false`, TRL
   `bf16=True|False` on the same fp32-loaded model), each side in its own process,
3. prints one row per (method, config): throughput and its ratio to TRL, peak RSS and its ratio,
   MFU of each side against the peak of the precision used; writes benchmarks/results/all.json.

Sizes: `full` are each benchmark's defaults (the figures in README.md); `quick` a few small steps.
`auto` (the default) runs a precision at `full` sizes when its measured matmul peak is at least
half of fp32's, else at `quick` sizes: a CPU without AMX / AVX512-BF16 converts bf16 in software
(here 0.02-0.2x fp32's GFLOP/s), and a full-size bf16 row would take hours. Each row says its sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    fmt,
    fmtx,
    machine_peak,
    print_peak,
    print_tables,
    result_header,
    results_path,
    write_results,
)

METHODS = ("sft", "dpo", "grpo")
# method: (throughput key, unit, target ratio to TRL of the issue: SFT 3x, DPO 3x, GRPO 2.5x)
THROUGHPUT = {"sft": ("tokens_per_second", "tokens/s", 3.0),
              "dpo": ("pairs_per_second", "pairs/s", 3.0),
              "grpo": ("completions_per_second", "completions/s", 2.5)}
SFT_MEMORY_TARGET = 0.35  # SFT peak RSS <= 0.35x TRL's in the same precision
# Small enough for software bf16 on 2 cores (~1-3 GFLOP/s: a 128-token training step is ~100 GFLOP).
QUICK = {"sft": ["--steps", "2", "--max_length", "128", "--batch_size", "1", "--skip_loss_check"],
         "dpo": ["--steps", "2", "--batch_size", "1"],
         "grpo": ["--steps", "2", "--prompts_per_step", "1", "--num_generations", "4",
                  "--max_completion_length", "8"]}


def parse_config(text: str) -> tuple[str, bool]:
    """'fp32' | 'bf16' | 'bf16+ckpt' -> (precision, gradient checkpointing)."""
    precision, _, rest = text.partition("+")
    if precision not in ("fp32", "bf16") or rest not in ("", "ckpt"):
        raise argparse.ArgumentTypeError(f"config {text!r}: expected fp32, bf16, fp32+ckpt or bf16+ckpt")
    return precision, rest == "ckpt"


def sides_of(method: str, res: dict) -> tuple[dict | None, dict | None]:
    if method == "dpo":
        return res["sides"].get("trl"), res["sides"].get("posttrain")
    return res.get("trl"), res.get("posttrain")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--configs", default="fp32,bf16",
                    help="comma-separated: fp32, bf16 (autocast, fp32 weights), fp32+ckpt, bf16+ckpt "
                         "(+ckpt: gradient checkpointing on both sides; bf16+ckpt = TRL's own defaults)")
    ap.add_argument("--sizes", choices=["auto", "full", "quick"], default="auto")
    ap.add_argument("--quick", action="store_true", help="= --sizes quick")
    ap.add_argument("--wait_quiet", type=float, default=300,
                    help="seconds each side waits for other processes to leave the CPUs idle")
    ap.add_argument("--results_dir", default=str(HERE / "results"),
                    help="where all.json and each row's <method>[-bf16][-ckpt][-quick].json go")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods):
        ap.error(f"--methods: choose from {METHODS}")
    configs = [parse_config(c) for c in args.configs.split(",") if c]
    sizes = "quick" if args.quick else args.sizes

    t_start = time.perf_counter()
    peak_file = Path(tempfile.mkdtemp(prefix="bench-all-")) / "peak.json"
    peak = machine_peak(peak_file)
    print_peak(peak)

    rows, table, failed = [], [], []
    for precision, ckpt in configs:
        size = sizes if sizes != "auto" else (
            "full" if peak[f"{precision}_gflops"] >= 0.5 * peak["fp32_gflops"] else "quick")
        for method in methods:
            out = Path(args.results_dir) / results_path(method, precision, ckpt).name
            if size == "quick":
                out = out.with_name(out.stem + "-quick.json")
            cmd = [sys.executable, str(HERE / f"bench_{method}.py"), "--precision", precision,
                   "--peak_json", str(peak_file), "--wait_quiet", str(args.wait_quiet), "--results", str(out)]
            cmd += ["--gradient_checkpointing"] if ckpt else []
            cmd += ["--only", "trl,posttrain"] if method == "dpo" else []
            cmd += QUICK[method] if size == "quick" else []
            label = f"{method} {precision}{' +ckpt' if ckpt else ''} ({size})"
            print(f"\n##### {label}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.run(cmd).returncode
            minutes = (time.perf_counter() - t0) / 60
            if rc != 0 or not out.exists():
                failed.append(label)
                continue
            t, p = sides_of(method, json.loads(out.read_text()))
            key, unit, target = THROUGHPUT[method]
            speed = p[key] / t[key] if t and p and t.get(key) else None
            mem = p["peak_rss_kib_wait4"] / t["peak_rss_kib_wait4"] if t and p else None
            row = {"method": method, "precision": precision, "gradient_checkpointing": ckpt, "sizes": size,
                   "unit": unit, "trl": t and t.get(key), "posttrain": p and p.get(key), "ratio": speed,
                   "target_ratio": target, "trl_peak_rss_gib": t and t.get("peak_rss_gib"),
                   "posttrain_peak_rss_gib": p and p.get("peak_rss_gib"), "rss_ratio": mem,
                   "trl_mfu": t and t.get("mfu"), "posttrain_mfu": p and p.get("mfu"),
                   "results": str(out), "minutes": minutes}
            rows.append(row)
            table.append([method.upper(), f"{'bf16 autocast' if precision == 'bf16' else 'fp32'}",
                          "on" if ckpt else "off", size, unit, fmt(row["trl"], ".3g"), fmt(row["posttrain"], ".3g"),
                          fmtx(speed) + f" (>= {target:g}x)", fmt(row["trl_peak_rss_gib"], ".2f"),
                          fmt(row["posttrain_peak_rss_gib"], ".2f"),
                          fmtx(mem) + (f" (<= {SFT_MEMORY_TARGET:g}x)" if method == "sft" else ""),
                          fmt(row["trl_mfu"], ".1%"), fmt(row["posttrain_mfu"], ".1%"), f"{minutes:.1f}"])

    total = (time.perf_counter() - t_start) / 60
    print()
    print_peak(peak)
    header = ["", "precision (both)", "grad ckpt", "sizes", "unit", "TRL", "posttrain", "/ TRL (target)",
              "TRL RSS GiB", "posttrain RSS GiB", "/ TRL", "MFU TRL", "MFU posttrain", "minutes"]
    print_tables(f"posttrain vs TRL - SmolLM2-135M-Instruct, CPU; MFU = model FLOPs/s / measured matmul peak "
                 f"of the precision used (SFT 6N x tokens; DPO 6N policy + 2N reference per token; GRPO 2N "
                 f"generation + 6N training per completion token); total {total:.1f} min",
                 header, table, width=200)
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the output above)")
    all_json = Path(args.results_dir) / "all.json"
    write_results(all_json, {**result_header("all", command=True, peak=peak), "rows": rows,
                                 "failed": failed, "total_minutes": total})
    print(f"\nresults: {all_json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
