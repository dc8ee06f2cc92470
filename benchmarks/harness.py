"""What every posttrain-vs-TRL benchmark shares: running a side, measuring it, printing, saving.

Standard library only at import time: the orchestrators (bench_*.py, .venv) and the runners
(posttrain_*_runner.py in .venv, trl_*_runner.py in .venv-bench) all import it.

Orchestrator side
    run_side            one side in a fresh child process: exit code, peak RSS (os.wait4), wall and
                        CPU seconds, and how many cores other processes used meanwhile; waits for a
                        quiet machine first
    run_side_quietly    run_side, again (up to `attempts` times) while other processes slowed it down
    record_process      copy a run_side record into a side's result dict (peak RSS, wall, contention)
    median, ratio, fmt, fmtx, verdict
    print_tables        the side-by-side table (+ targets table), with rich when it is installed
    warn_contention     the "timings are not reliable" line
    result_header, write_results   benchmarks/results/<name>.json with date, commit, machine
    machine_peak        the measured torch matmul GFLOP/s in fp32 and bf16 + the CPU's bf16 capability
                        (measured once per bench run, printed at the top, saved in every results file)
    precision_label, model_params, model_flops, mfu    MFU = model FLOPs/s / peak of the precision used

Runner side
    run_cli             run a `posttrain ...` command as a user would, peak RSS from wait4 on it,
                        optionally timestamping its output lines
    read_run            OUTPUT_DIR/metrics.jsonl step lines and run_summary.json
    vm_hwm_kib          this process's peak RSS (VmHWM)
    make_step_timer     a transformers TrainerCallback timing first step start .. every step end
    write_runner_result the runner's JSON result (+ a short summary on stdout)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_PYTHON = str(ROOT / ".venv-bench" / "bin" / "python")
CONTENTION = 0.2  # cores used by other processes above which a side's timings are not trusted


# ---------------------------------------------------------------------------- machine load


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent non-idle by the whole machine since boot (all cores, from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def other_load(seconds: float = 2.0) -> float | None:
    """Cores kept busy by other processes right now (sampled over `seconds`)."""
    a = cpu_busy_seconds()
    time.sleep(seconds)
    b = cpu_busy_seconds()
    return None if a is None or b is None else (b - a) / seconds


def wait_for_quiet(wait_quiet: float) -> float | None:
    """Wait up to `wait_quiet` seconds for other processes to leave the CPUs idle; the load seen last."""
    load = other_load()
    deadline = time.monotonic() + wait_quiet
    while load is not None and load > CONTENTION and time.monotonic() < deadline:
        print(f"    waiting for a quiet machine (other processes use {load:.1f} cores)", flush=True)
        time.sleep(10)
        load = other_load()
    return load


# ---------------------------------------------------------------------------- running a side


def run_side(name: str, cmd: list[str], log_path: Path, wait_quiet: float = 0.0, env: dict | None = None) -> dict:
    """Run one side in a fresh child process: exit code, peak RSS, wall and CPU seconds, and how
    many cores other processes used meanwhile (contention makes timings unreliable). Waits up
    to `wait_quiet` seconds for other processes to leave the CPUs idle first."""
    idle_before = wait_for_quiet(wait_quiet)
    print(f"\n=== {name}: {' '.join(cmd)}\n    (log: {log_path})", flush=True)
    if idle_before is not None and idle_before > CONTENTION:
        print(f"    warning: other processes are using {idle_before:.1f} cores: timings will be unreliable",
              flush=True)
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    busy1 = cpu_busy_seconds()
    cpu = rusage.ru_utime + rusage.ru_stime
    other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        print(f"--- {name} failed (exit {rc}); last lines of its log:\n{tail}", flush=True)
    else:
        print(f"    done in {wall:.1f}s, peak RSS {rusage.ru_maxrss / 1024**2:.2f} GiB, "
              f"{cpu:.0f} CPU s; other processes used {fmt(other, '.2f')} cores meanwhile", flush=True)
    return {"rc": rc, "peak_rss_kib": rusage.ru_maxrss, "wall": wall, "cpu_seconds": cpu,
            "other_cores_before": idle_before, "other_cores_during": other}


def run_side_quietly(name: str, cmd: list[str], log_path: Path, out_json: Path, wait_quiet: float,
                     attempts: int) -> tuple[dict, int, list[dict]]:
    """run_side, repeated (after the quiet wait) while other processes used more than CONTENTION
    cores during it, up to `attempts` runs in all. Returns (last run, attempts made, the earlier
    contended attempts' timings)."""
    contended: list[dict] = []
    for attempt in range(1, attempts + 1):
        run = run_side(name, cmd, log_path, wait_quiet)
        if run["rc"] != 0:
            return run, attempt, contended
        busy = run["other_cores_during"]
        if busy is None or busy <= CONTENTION or attempt == attempts:
            return run, attempt, contended
        prev = json.loads(out_json.read_text())
        contended.append({"attempt": attempt, "other_cores_busy_during": busy,
                          "train_seconds": prev.get("train_seconds"),
                          "step_seconds": [st.get("step_seconds") for st in prev.get("per_step", [])]})
        print(f"    other processes used {busy:.2f} cores during {name}: its timings are not reliable; "
              f"running it again (attempt {attempt + 1} of {attempts})", flush=True)
    raise AssertionError("unreachable")


def record_process(res: dict, run: dict) -> dict:
    """The orchestrator's own measurements of a side's process, added to its result."""
    res["peak_rss_kib_wait4"] = run["peak_rss_kib"]
    res["peak_rss_gib"] = run["peak_rss_kib"] / 1024**2
    res["wall_seconds_with_startup"] = run["wall"]
    res["process_cpu_seconds"] = run["cpu_seconds"]
    res["other_cores_busy_before"] = run["other_cores_before"]
    res["other_cores_busy_during"] = run["other_cores_during"]
    return res


# ---------------------------------------------------------------------------- numbers and text


def median(values) -> float | None:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def ratio(ours: dict | None, theirs: dict | None, key: str) -> float | None:
    """ours[key] / theirs[key], or None when either side lacks it."""
    if ours and theirs and theirs.get(key) and ours.get(key) is not None:
        return ours[key] / theirs[key]
    return None


def fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if spec.endswith("d") and isinstance(v, float):  # counts that went through a float metric
        v = round(v)
    return format(v, spec)


def fmtx(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("MET" if ok else "NOT MET")


def print_tables(title: str, header: list[str], rows: list[list[str]], targets: list[tuple] | None = None,
                 width: int = 110, plain: bool = False) -> None:
    """The side-by-side table (first column left-aligned, the rest right-aligned) and, when given,
    the targets table (target, measured, verdict); rich when installed (and not `plain`), plain
    text otherwise."""
    try:
        if plain:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(("\n" if plain else "") + title)
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                            for i, c in enumerate(row)))
        for row in targets or []:
            print(f"{row[0]:<70}{row[1]:>30}  {row[2]}")
        return
    console = Console(width=max(Console().width, width))
    tb = Table(title=title)
    for h in header:
        tb.add_column(h, justify="left" if not h else "right")
    for row in rows:
        tb.add_row(*row)
    console.print(tb)
    if targets:
        tg = Table(title="Targets")
        for h in ("target", "measured", ""):
            tg.add_column(h)
        for row in targets:
            tg.add_row(*row)
        console.print(tg)


def warn_contention(sides) -> None:
    busy = [s["other_cores_busy_during"] for s in sides if s and s.get("other_cores_busy_during") is not None]
    if busy and max(busy) > CONTENTION:
        print(f"WARNING: other processes used up to {max(busy):.2f} of {os.cpu_count()} cores during the runs: "
              "the timings above are not reliable; rerun on a quiet machine.")


# ---------------------------------------------------------------------------- results files


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def result_header(benchmark: str, command: bool = False, peak: dict | None = None) -> dict:
    """The first keys of every results/*.json: what, when, at which commit, on which machine (and
    its measured matmul peak, `machine_peak`)."""
    head = {"benchmark": benchmark,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit()}
    if command:
        head["command"] = " ".join([".venv/bin/python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    head["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if peak is not None:
        head["matmul_peak"] = peak
    return head


def write_results(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def default_model_dir(model_dir: str | None) -> str:
    """`model_dir`, or posttrain's embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    if model_dir is not None:
        return model_dir
    from posttrain.models.default_model import default_model_dir as _default

    return str(_default())


# ---------------------------------------------------------------------------- matmul peak and MFU

PRECISIONS = ("fp32", "bf16")  # bf16 = bf16 autocast of forward/backward, fp32 master weights on both tools
# (m, k, n, layout): "nt" = x (m,k) @ w.T with w stored (n,k), nn.Linear's forward; "nn" = a @ b, the
# layout of the input gradient. One MLP matmul of SmolLM2-135M at 1024 tokens in both layouts, then
# squares. The layouts differ: without native bf16, torch's fallback bf16 gemm is several times
# faster in "nt" than in "nn". A shape whose estimated time exceeds the budget is skipped (without
# native bf16 a 2048^3 bf16 matmul can take minutes on a small CPU).
PEAK_SHAPES = ((1024, 576, 1536, "nt"), (1024, 576, 1536, "nn"), (1024, 1024, 1024, "nn"),
               (2048, 2048, 2048, "nn"))


def cpu_bf16_capability() -> dict:
    """What this CPU offers for bf16: torch's dispatch level and the /proc/cpuinfo flags that matter
    (AMX-BF16 and AVX512-BF16 multiply bf16 natively; without them bf16 matmuls convert in software)."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = None
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")},
            "mkldnn_bf16_supported": mkldnn_bf16}


def _time_matmul(m: int, k: int, n: int, layout: str, dtype, budget_s: float) -> dict:
    """GFLOP/s of one (m,k) x (k,n) matmul: best and median of a few timed calls after a warm one."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = w.T if layout == "nt" else w.T.contiguous()

    t0 = time.perf_counter()
    a @ b  # warm: allocator, oneDNN primitive creation
    first = time.perf_counter() - t0
    times = [first] if first >= budget_s else []  # a slow kernel: its one-off set-up is negligible
    for _ in range(0 if times else max(2, min(20, int(budget_s / max(first, 1e-6))))):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flop = 2.0 * m * k * n
    return {"shape": [m, k, n], "layout": layout, "repeats": len(times), "best_gflops": flop / min(times) / 1e9,
            "median_gflops": flop / median(times) / 1e9}


def measure_matmul_peak(budget_s: float = 1.5) -> dict:
    """torch matmul GFLOP/s in fp32 and bf16 on this machine, at torch.get_num_threads() threads.
    The peak of a precision is the best over PEAK_SHAPES (each timed for about `budget_s`)."""
    import torch

    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                 "capability": cpu_bf16_capability(), "shapes": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        runs: list[dict] = []
        for m, k, n, layout in PEAK_SHAPES:
            if runs and 2.0 * m * k * n / (min(r["best_gflops"] for r in runs) * 1e9) > budget_s:
                continue  # estimated over the budget
            runs.append(_time_matmul(m, k, n, layout, dtype, budget_s))
        out["shapes"][name] = runs
        out[f"{name}_gflops"] = max(r["best_gflops"] for r in runs)
    out["bf16_over_fp32"] = out["bf16_gflops"] / out["fp32_gflops"]
    return out


def machine_peak(path: str | Path | None = None) -> dict:
    """The matmul peak, read from `path` when a bench_all.py run measured it already, else measured
    now (and written to `path` when given), so one run of benchmarks uses one measurement."""
    if path is not None and Path(path).exists():
        return json.loads(Path(path).read_text())
    peak = measure_matmul_peak()
    peak["measured_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if path is not None:
        write_results(path, peak)
    return peak


def describe_peak(peak: dict) -> str:
    cap = peak["capability"]
    native = [f for f in ("amx_bf16", "avx512_bf16") if cap.get(f)]
    return (f"matmul peak ({peak['cpu']}, torch {peak['torch']}, {peak['threads']} threads; best of "
            f"{' / '.join('x'.join(map(str, r['shape'])) + ' ' + r['layout'] for r in peak['shapes']['fp32'])}): fp32 {peak['fp32_gflops']:.1f} GFLOP/s, "
            f"bf16 {peak['bf16_gflops']:.1f} GFLOP/s = {peak['bf16_over_fp32']:.2f}x fp32\n"
            f"CPU bf16: torch capability {cap['torch_cpu_capability']}, "
            f"{'native bf16 (' + ', '.join(native) + ')' if native else 'no amx_bf16 / avx512_bf16 (bf16 is converted in software)'}"
            f", oneDNN bf16 {cap.get('mkldnn_bf16_supported')}")


def print_peak(peak: dict) -> None:
    print(describe_peak(peak), flush=True)


def precision_label(precision: str, gradient_checkpointing: bool) -> str:
    """The row label saying the matched settings: 'fp32', 'bf16 autocast', '+ grad ckpt'."""
    label = "bf16 autocast (fp32 weights)" if precision == "bf16" else "fp32"
    return label + (", gradient checkpointing" if gradient_checkpointing else ", no checkpointing")


def model_params(model_dir: str) -> int:
    """Parameters of the model (tied matrices once), built on the meta device: no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def model_flops(n_params: int, trained_tokens: float, forward_only_tokens: float = 0.0) -> float:
    """6 N per trained token (forward 2N + backward 4N) + 2 N per forward-only token (reference
    model, generation). N counts every parameter once; with the embedding tied to the LM head (as
    SmolLM2) that is the head matmul. Attention's T^2 terms are not counted (small at these lengths)."""
    return 6.0 * n_params * trained_tokens + 2.0 * n_params * forward_only_tokens


def results_path(benchmark: str, precision: str, gradient_checkpointing: bool) -> Path:
    """results/<benchmark>.json for fp32 without checkpointing (the earlier files), else e.g.
    results/sft-bf16-ckpt.json."""
    tag = ("" if precision == "fp32" else f"-{precision}") + ("-ckpt" if gradient_checkpointing else "")
    return HERE / "results" / f"{benchmark}{tag}.json"


def add_precision_args(ap) -> None:
    """--precision, --gradient_checkpointing and --peak_json, the same on every bench_*.py."""
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="both sides: fp32, or bf16 autocast of forward/backward (fp32 weights and AdamW state)")
    ap.add_argument("--gradient_checkpointing", action="store_true",
                    help="turn it on for both sides (TRL's own default is on; off here unless given)")
    ap.add_argument("--peak_json", default=None,
                    help="read the matmul peak from this file (bench_all.py measures it once), else measure it")


def mfu(flops: float | None, seconds: float | None, peak: dict, precision: str) -> float | None:
    """Achieved model FLOPs/s over the measured matmul peak of the precision used."""
    if not flops or not seconds:
        return None
    return flops / seconds / (peak[f"{precision}_gflops"] * 1e9)


# ---------------------------------------------------------------------------- runner side


def run_cli(cmd: list[str], env: dict | None = None, stamp_lines: bool = False) -> dict:
    """Run a CLI command as a user would; its peak RSS from os.wait4 on it. With `stamp_lines`, its
    output is echoed and kept as (seconds since start, line) pairs. Raises SystemExit on failure."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    stamped: list[tuple[float, str]] = []
    if stamp_lines:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.perf_counter() - t0, line.rstrip("\n")))
            sys.stdout.write(line)
            sys.stdout.flush()
    else:
        proc = subprocess.Popen(cmd, env=env)
    _, status, rusage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed with exit code {rc}")
    return {"process_seconds": time.perf_counter() - t0, "peak_rss_kib": rusage.ru_maxrss, "lines": stamped}


def read_run(output_dir: Path) -> tuple[list[dict], dict]:
    """(metrics.jsonl lines that carry a loss, run_summary.json or {}) of a posttrain output dir."""
    records = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary_path = output_dir / "run_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return [r for r in records if "loss" in r], summary


def posttrain_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("posttrain")
    except PackageNotFoundError:
        return None


def vm_hwm_kib() -> int | None:
    """This process's peak RSS so far (VmHWM, KiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def make_step_timer():
    """A TrainerCallback recording the start of the first optimizer step and the end of every step
    (the train-time window of the TRL runners). Imports transformers, so call it in .venv-bench."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.t_first_begin: float | None = None
            self.step_end_times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if self.t_first_begin is None:
                self.t_first_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_end_times.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            ends = self.step_end_times
            return [b - a for a, b in zip([self.t_first_begin, *ends[:-1]], ends)]

    return StepTimer()


def write_runner_result(out: str | Path, result: dict, hide: tuple = ("per_step", "run_summary")) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in hide}, indent=2))
