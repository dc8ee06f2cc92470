"""One harness for every recipe's 2-process CPU (gloo) test (pitfall 27; docs/distributed.md).

A case is a recipe command and its arguments. Each test runs, as a user would (the CLI in fresh
processes, OMP_NUM_THREADS=1 per rank):

  one   1 process, per_device_train_batch_size B, gradient_accumulation_steps 2, 2 steps
  two   2 processes (torchrun WITHOUT ACCELERATE_USE_CPU: posttrain must join them itself),
        B per process, accumulation 1, 2 steps, a checkpoint after step 1
  again 2 processes resumed from `two`'s step-1 checkpoint

and asserts: `two`'s updates equal `one`'s (logged loss, grad norm, every metric, saved weights
after both steps); `again` ends where `two` did; for online recipes, no prompt is sampled
twice in the epoch and the two ranks' completions of the same prompt text differ.

Why 1 x (B, accumulation 2) is the doubled batch: the BatchPlan gives process r micro-batch r
of a step, so `one`'s two micro-batches are `two`'s two ranks' batches, example for example, and
online samples come from per-prompt seeds (rollout_seeds), so they are the same completions too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.numerics import EXACT64_ABS, EXACT64_REL

REPO = Path(__file__).resolve().parents[2]

# Every compared run is in float64 (FLOAT64 in each case's options): 1 process x 2 micro-batches
# and 2 processes differ only in the order of sums (the micro-batches' gradients, DDP's all-reduce,
# FSDP2's reduce-scatter and its grad norm over shards, a differently padded sampling batch), which
# is exact in real arithmetic; tests/numerics.py derives EXACT64_REL / EXACT64_ABS for that.
REL, ABS = EXACT64_REL, EXACT64_ABS
LR = 1e-3
WEIGHT_ATOL, WEIGHT_RTOL = EXACT64_ABS, EXACT64_REL
# the options that make a CLI run float64 with no autocast, whatever the CPU
FLOAT64_OPTIONS = {"dtype": "float64", "bf16": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK")}
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
    return e


def as_args(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", str(v))]


def launch(command: str, options: dict, *, processes: int, extra_env: dict | None = None,
           launcher: str = "torchrun", timeout: int = 900, entry: str = "posttrain.cli") -> subprocess.CompletedProcess:
    """`posttrain <command>` in 1 process, or `processes` ranks under torchrun / accelerate launch;
    `entry`: the module run instead of the CLI (tests.distributed.fsdp2_entry: FSDP2)."""
    cli = ["-m", entry, command, *as_args(options)]
    if processes == 1:
        cmd = [sys.executable, *cli]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), *cli]
    else:  # accelerate's own launcher, as a GPU user types it
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *cli]
    proc = subprocess.run(cmd, env=env(**(extra_env or {})), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# timing and the run's own bookkeeping, not numbers of the update
NOT_COMPARED = {"tokens_per_second", "elapsed_seconds", "step", "epoch", "learning_rate"}


def assert_same_row(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in sorted(set(a) - NOT_COMPARED):
        x, y = a[key], b[key]
        if isinstance(x, float) and x != x:  # NaN (e.g. a reward that applied to nothing)
            assert y != y, key
            continue
        assert abs(x - y) <= REL * max(abs(x), abs(y)) + ABS, (key, x, y)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=k)


@dataclass
class Case:
    command: str
    options: dict  # data, model and method options (not batch sizes, steps or output)
    batch: int = 4  # per_device_train_batch_size of every run
    online: bool = False
    extra: dict = field(default_factory=dict)


def run_case(case: Case, tmp: Path) -> dict:
    """The three runs and every assertion; returns the log of the 2-process run for extra checks."""
    base = {**case.options, "per_device_train_batch_size": case.batch, "learning_rate": LR,
            "logging_steps": 1, "disable_tqdm": True, "seed": 5, "max_grad_norm": 0.0, **case.extra}
    log = tmp / "rollouts"
    one, two, again = tmp / "one", tmp / "two", tmp / "again"
    launch(case.command, {**base, "output_dir": one, "max_steps": 2, "save_steps": 0,
                          "gradient_accumulation_steps": 2}, processes=1)
    proc = launch(case.command, {**base, "output_dir": two, "max_steps": 2, "save_steps": 1,
                                 "gradient_accumulation_steps": 1}, processes=2,
                  extra_env={"POSTTRAIN_TEST_ROLLOUT_LOG": str(log)})
    assert "processes: 2" in proc.stdout + proc.stderr
    for a, b in zip(metrics(one), metrics(two), strict=True):  # the first update, and the second
        assert_same_row(a, b)
    assert_same_weights(one, two)
    saved = sorted((two / "checkpoints").glob("step-*"))
    assert len(saved) == 1  # after step 1 (none at the last step: the final model is saved)
    shutil.copytree(two, again)
    for done in ("model.safetensors", "metrics.jsonl"):  # the resumed run must write its own
        (again / done).unlink()
    ckpt = again / "checkpoints" / saved[0].name
    launch(case.command, {**base, "output_dir": again, "max_steps": 2, "save_steps": 1,
                          "gradient_accumulation_steps": 1, "resume_from_checkpoint": ckpt}, processes=2)
    assert_same_row(metrics(two)[-1], metrics(again)[-1])
    assert_same_weights(two, again)
    seen = {}
    if case.online:
        seen = {r: [json.loads(x) for x in Path(f"{log}.{r}").read_text().splitlines()] for r in (0, 1)}
        uids = [row["uid"] for r in (0, 1) for row in seen[r]]
        per_prompt = len(uids) // len(set(uids))
        # 2 steps = one epoch of the 8 prompts: each sampled once (its group of completions), none twice
        assert sorted(set(uids)) == list(range(8)) and all(uids.count(u) == per_prompt for u in set(uids))
        # every prompt has the same text: the ranks' completions of it must still differ
        assert [x["completion"] for x in seen[0]] != [x["completion"] for x in seen[1]]
    return seen
