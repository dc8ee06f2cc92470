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


def result_header(benchmark: str, command: bool = False) -> dict:
    """The first keys of every results/*.json: what, when, at which commit, on which machine."""
    head = {"benchmark": benchmark,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit()}
    if command:
        head["command"] = " ".join([".venv/bin/python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    head["machine"] = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
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
