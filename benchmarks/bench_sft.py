"""SFT benchmark: posttrain vs TRL's SFTTrainer on the same model, data and settings.

    make bench          # = bash benchmarks/setup_bench_env.sh && .venv/bin/python benchmarks/bench_sft.py
    .venv/bin/python benchmarks/bench_sft.py --steps 8 --max_length 512 --batch_size 2 [--only trl|posttrain]

1. writes the workload (benchmarks/workload.py, seeded) to benchmarks/.data/sft.jsonl,
2. runs TRL (benchmarks/trl_sft_runner.py, with .venv-bench/bin/python) in a fresh process,
3. runs posttrain (benchmarks/posttrain_sft_runner.py -> `posttrain sft`) in a fresh process,
4. prints both side by side with the ratios and the targets, and writes benchmarks/results/sft.json.

Peak memory is measured the same way for both: each side runs in its own child process and
its peak RSS is read from os.wait4 on that child (the kernel's ru_maxrss, which covers the
child and any process it waited for). Every number printed is measured in this run; a side
that was not run (--only) is shown as "-" and no ratio is computed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import workload  # noqa: E402

TARGET_SPEEDUP = 3.0  # posttrain tokens/s >= 3x TRL's
TARGET_MEMORY = 0.5  # posttrain peak RSS <= 0.5x TRL's
LOSS_TOLERANCE = 0.05  # step-0 losses should agree within 5 %


def _cpu_busy_seconds() -> float | None:
    """CPU seconds spent non-idle by the whole machine since boot (all cores, from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _other_load(seconds: float = 2.0) -> float | None:
    """Cores kept busy by other processes right now (sampled over `seconds`)."""
    a = _cpu_busy_seconds()
    time.sleep(seconds)
    b = _cpu_busy_seconds()
    return None if a is None or b is None else (b - a) / seconds


def _run_side(name: str, cmd: list[str], log_path: Path, wait_quiet: float = 0.0) -> dict:
    """Run one side in a fresh child process: exit code, peak RSS, wall and CPU seconds, and how
    many cores other processes used meanwhile (contention makes timings unreliable). Waits up
    to `wait_quiet` seconds for other processes to leave the CPUs idle first."""
    idle_before = _other_load()
    deadline = time.monotonic() + wait_quiet
    while idle_before is not None and idle_before > 0.2 and time.monotonic() < deadline:
        print(f"    waiting for a quiet machine (other processes use {idle_before:.1f} cores)", flush=True)
        time.sleep(10)
        idle_before = _other_load()
    print(f"\n=== {name}: {' '.join(cmd)}\n    (log: {log_path})", flush=True)
    if idle_before is not None and idle_before > 0.2:
        print(f"    warning: other processes are using {idle_before:.1f} cores: timings will be unreliable",
              flush=True)
    busy0 = _cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy1 = _cpu_busy_seconds()
    cpu = rusage.ru_utime + rusage.ru_stime
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        print(f"--- {name} failed (exit {rc}); last lines of its log:\n{tail}", flush=True)
    else:
        print(f"    done in {wall:.1f}s, peak RSS {rusage.ru_maxrss / 1024**2:.2f} GiB, "
              f"{cpu:.0f} CPU s; other processes used {_fmt(other, '.2f')} cores meanwhile", flush=True)
    return {"rc": rc, "peak_rss_kib": rusage.ru_maxrss, "wall": wall, "cpu_seconds": cpu,
            "other_cores_before": idle_before, "other_cores_during": other}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps on each side")
    ap.add_argument("--max_length", type=int, default=512, help="packed row length in tokens")
    ap.add_argument("--batch_size", type=int, default=2, help="packed rows per step (per device)")
    ap.add_argument("--learning_rate", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rows", type=int, default=workload.DEFAULT_ROWS, help="rows in the generated dataset")
    ap.add_argument("--data_seed", type=int, default=workload.DEFAULT_SEED)
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="turn it on for both sides (TRL's own default is on; off here on both)")
    ap.add_argument("--only", choices=["trl", "posttrain"], help="run one side only")
    ap.add_argument("--model_dir", default=None, help="default: posttrain's embedded SmolLM2-135M-Instruct")
    ap.add_argument("--bench_python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                    help="python of the venv that has TRL")
    ap.add_argument("--data_dir", default=str(HERE / ".data"))
    ap.add_argument("--results", default=str(HERE / "results" / "sft.json"))
    ap.add_argument("--wait_quiet", type=float, default=300,
                    help="seconds to wait, before each side, for other processes to leave the CPUs idle")
    ap.add_argument("--skip_loss_check", action="store_true",
                    help="do not recompute the step-1 losses independently")
    ap.add_argument("--keep_outputs", action="store_true", help="keep both runs' output dirs")
    args = ap.parse_args()

    data_dir = Path(args.data_dir)
    data_path = workload.write_jsonl(data_dir / "sft.jsonl", rows=args.rows, seed=args.data_seed)
    if args.model_dir is None:
        from posttrain.models.default_model import default_model_dir

        args.model_dir = str(default_model_dir())
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    common = [
        "--data", str(data_path), "--model_dir", args.model_dir,
        "--steps", str(args.steps), "--max_length", str(args.max_length),
        "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed),
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
        run = _run_side(side, cmd, work / f"{side}.log", args.wait_quiet)
        if run["rc"] != 0:
            return run["rc"]
        res = json.loads(out_json.read_text())
        losses = [st["loss"] for st in res.get("per_step", []) if st.get("loss") is not None]
        res["mean_loss"] = sum(losses) / len(losses) if losses else None
        res["peak_rss_kib_wait4"] = run["peak_rss_kib"]
        res["peak_rss_gib"] = run["peak_rss_kib"] / 1024**2
        res["wall_seconds_with_startup"] = run["wall"]
        res["process_cpu_seconds"] = run["cpu_seconds"]
        res["other_cores_busy_before"] = run["other_cores_before"]
        res["other_cores_busy_during"] = run["other_cores_during"]
        sides[side] = res

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
        if t and p and t.get(key) and p.get(key) is not None:
            return p[key] / t[key]
        return None

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
        ("first loss (step 1, as logged)", "first_loss", ".4f"),
        ("step-1 loss recomputed on the same batch", "first_loss_reference", ".4f"),
        ("last loss", "last_loss", ".4f"),
        ("mean loss over the steps", "mean_loss", ".4f"),
        ("process wall seconds (incl. load/save)", "wall_seconds_with_startup", ".1f"),
        ("process CPU seconds (incl. load/save)", "process_cpu_seconds", ".1f"),
        ("cores used by other processes (contention)", "other_cores_busy_during", ".2f"),
    ]
    title = (f"SFT benchmark - SmolLM2-135M-Instruct fp32, CPU x{os.cpu_count()}, {args.steps} steps, "
             f"batch {args.batch_size} x packed {args.max_length}, lr {args.learning_rate}, seed {args.seed}"
             f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    header = ("", "TRL SFTTrainer", "posttrain sft", "posttrain / TRL")
    table = []
    for label, key, spec in rows:
        r = ratio(key) if key not in ("steps", "first_loss", "first_loss_reference", "last_loss", "mean_loss",
                                          "other_cores_busy_during") else None
        table.append((label, _fmt(t.get(key) if t else None, spec), _fmt(p.get(key) if p else None, spec),
                      _fmt(r, ".2f") + ("x" if r is not None else "")))

    def verdict(value, ok) -> str:
        return "not measured" if value is None else ("MET" if ok(value) else "NOT MET")

    targets = [
        (f"tokens/s >= {TARGET_SPEEDUP:g}x TRL", _fmt(speedup, ".2f") + "x",
         verdict(speedup, lambda v: v >= TARGET_SPEEDUP)),
        (f"peak memory <= {TARGET_MEMORY:g}x TRL", _fmt(mem_ratio, ".2f") + "x",
         verdict(mem_ratio, lambda v: v <= TARGET_MEMORY)),
        (f"step-1 losses agree within {LOSS_TOLERANCE:.0%} (different batches!)", _fmt(loss_diff, ".1%"),
         verdict(loss_diff, lambda v: v <= LOSS_TOLERANCE)),
    ]
    for side, label in (("trl", "TRL"), ("posttrain", "posttrain")):
        err = sides.get(side, {}).get("first_loss_reference_error")
        if err is not None:
            targets.append((f"{label} step-1 loss = recomputation (0.5%)", f"{err:+.2%}",
                            verdict(abs(err), lambda v: v <= 0.005)))
    try:
        from rich.console import Console
        from rich.table import Table

        console = Console(width=max(Console().width, 110))
        tb = Table(title=title)
        for h in header:
            tb.add_column(h, justify="left" if not h else "right")
        for row in table:
            tb.add_row(*row)
        console.print(tb)
        tg = Table(title="Targets")
        for h in ("target", "measured", ""):
            tg.add_column(h)
        for row in targets:
            tg.add_row(*row)
        console.print(tg)
    except ImportError:
        print(title)
        for row in [header] + table:
            print(f"{row[0]:<42}{row[1]:>16}{row[2]:>16}{row[3]:>16}")
        for row in targets:
            print(f"{row[0]:<42}{row[1]:>16}{row[2]:>16}")

    busy = [s_["other_cores_busy_during"] for s_ in (t, p) if s_ and s_.get("other_cores_busy_during") is not None]
    if busy and max(busy) > 0.2:
        print(f"WARNING: other processes used up to {max(busy):.2f} of {os.cpu_count()} cores during the runs: "
              "the timings above are not reliable; rerun on a quiet machine.")

    result = {
        "benchmark": "sft",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()},
        "config": {
            "model_dir": args.model_dir, "dtype": "float32", "steps": args.steps, "max_length": args.max_length,
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
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {results_path}\nlogs: {work}/*.log")
    if not args.keep_outputs:
        for side in plan:
            shutil.rmtree(work / f"{side}-run", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
