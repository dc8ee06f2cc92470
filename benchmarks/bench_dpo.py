"""DPO benchmark: posttrain vs TRL's DPOTrainer on the same model, preference pairs and settings.

    .venv/bin/python benchmarks/bench_dpo.py --steps 10 --batch_size 8 [--only trl,posttrain,posttrain_precompute]

1. writes the workload (posttrain.demo.tasks.generate_preferences, seeded: conversational
   prompt/chosen/rejected pairs) to benchmarks/.data/dpo.jsonl,
2. runs TRL (benchmarks/trl_dpo_runner.py, with .venv-bench/bin/python) in a fresh process,
3. runs posttrain (benchmarks/posttrain_dpo_runner.py -> `posttrain dpo`) in a fresh process,
4. runs posttrain again with --precompute_ref_log_probs (reference log-probs computed once
   before training, the reference weights freed; its train time excludes that pass, which is
   reported separately),
5. checks that both tools tokenised the pairs the same way, prints everything side by side with
   the ratios and the targets, and writes benchmarks/results/dpo.json.

Both sides: the embedded SmolLM2-135M-Instruct on CPU with fp32 weights, in the same precision
(--precision fp32, or bf16 autocast) and gradient checkpointing setting, sigmoid loss, beta 0.1, the same
lr / batch / steps / seed / max_length, linear decay without warmup, AdamW, clipping at 1.0,
no eval, no checkpoints, the reference a separate frozen copy of the model. TRL's own defaults
bf16=True and gradient_checkpointing=True are set explicitly to the row's settings, as in the SFT benchmark.

Peak memory is measured the same way for every side: each runs in its own child process and its
peak RSS is read from os.wait4 on that child (the kernel's ru_maxrss, which covers the child and
any process it waited for). Timing helpers and the quiet-machine wait come from harness.py.
"""

from __future__ import annotations

import argparse
import json
import math
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
    CONTENTION,
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
    run_side_quietly,
    verdict,
    warn_contention,
    write_results,
)

TARGET_SPEEDUP = 3.0  # posttrain steps/s >= 3x TRL's in the same precision (issue 11) ...
TARGET_MEMORY = 0.5  # ... and peak RSS <= 0.5x TRL's
LN2 = math.log(2.0)
LOSS0_TOLERANCE = 1e-4  # the step-0 loss is ln 2 exactly when the policy equals the reference

SIDES = ("trl", "posttrain", "posttrain_precompute", "trl_precompute")
LABELS = {
    "trl": "TRL DPOTrainer",
    "posttrain": "posttrain dpo",
    "posttrain_precompute": "posttrain dpo --precompute_ref_log_probs",
    "trl_precompute": "TRL DPOTrainer precompute_ref_log_probs",
}


def write_pairs(path: Path, n_train: int, seed: int) -> Path:
    """The seeded preference pairs, one JSON object a line (prompt/chosen/rejected messages)."""
    from posttrain.demo.tasks import generate_preferences

    rows, _ = generate_preferences(seed=seed, n_train=n_train, n_eval=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    return path


def check_tokens(data_path: Path, model_dir: str, trl_dump: Path, max_length: int, max_prompt_length: int,
                 newline_id: int | None = None) -> dict:
    """Compare TRL's tokenised pairs (dumped by its runner) with posttrain's own data preparation.

    Known difference: TRL keeps the whitespace the ChatML template prints after the final
    <|im_end|> ("\\n") as a completion token, posttrain does not (see the SFT section of README)."""
    from transformers import AutoTokenizer

    from posttrain.data.formats import detect_format
    from posttrain.data.in_memory import as_loaded_rows
    from posttrain.data.preference import prepare_preference_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    loaded = as_loaded_rows(None, str(data_path), "train", None)
    ex, report = prepare_preference_examples(loaded, detect_format(loaded.rows, loaded.source), tok,
                                             max_length=max_length, max_prompt_length=max_prompt_length)
    ours = [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ex]
    theirs = [tuple(x) for x in json.loads(trl_dump.read_text())]
    newline_id = newline_id if newline_id is not None else tok.convert_tokens_to_ids("\u010a")  # "\n"
    identical = modulo_newline = 0
    for (p, c, r), (tp, tc, tr) in zip(ours, theirs):
        if (p, c, r) == (tp, tc, tr):
            identical += 1
        if p == tp and all(t == o or t == o + [newline_id] for o, t in ((c, tc), (r, tr))):
            modulo_newline += 1
    lengths = [len(p) + len(c) for p, c, _ in ours] + [len(p) + len(r) for p, _, r in ours]
    trl_lengths = [len(p) + len(c) for p, c, _ in theirs] + [len(p) + len(r) for p, _, r in theirs]
    return {"pairs_posttrain": len(ours), "pairs_trl": len(theirs), "identical": identical,
            "identical_but_trl_trailing_newline": modulo_newline,
            "posttrain_truncated": report.truncated,
            "max_sequence_tokens_posttrain": max(lengths), "max_sequence_tokens_trl": max(trl_lengths),
            "mean_sequence_tokens_posttrain": sum(lengths) / len(lengths),
            "mean_sequence_tokens_trl": sum(trl_lengths) / len(trl_lengths)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps on each side")
    ap.add_argument("--batch_size", type=int, default=8, help="preference pairs per step (per device)")
    ap.add_argument("--learning_rate", type=float, default=1e-6, help="default: both tools' DPO default")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--max_prompt_length", type=int, default=512,
                    help="posttrain only (TRL 1.x has no such option); no pair of this workload is truncated")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--pairs", type=int, default=256, help="preference pairs in the generated dataset")
    ap.add_argument("--data_seed", type=int, default=4321)
    ap.add_argument("--only", default="trl,posttrain,posttrain_precompute",
                    help=f"comma-separated sides to run, of: {', '.join(SIDES)}")
    ap.add_argument("--posttrain_padding_free", action="store_true",
                    help="run posttrain with --padding_free (TRL 1.x's DPO has no padding-free path)")
    ap.add_argument("--model_dir", default=None, help="default: posttrain's embedded SmolLM2-135M-Instruct")
    ap.add_argument("--bench_python", default=BENCH_PYTHON,
                    help="python of the venv that has TRL")
    ap.add_argument("--data_dir", default=str(HERE / ".data"))
    ap.add_argument("--results", default=None,
                    help="default: results/dpo.json (fp32), results/dpo-bf16[-ckpt].json, ...")
    add_precision_args(ap)
    ap.add_argument("--wait_quiet", type=float, default=300,
                    help="seconds to wait, before each side, for other processes to leave the CPUs idle")
    ap.add_argument("--attempts", type=int, default=3,
                    help="run a side again (after the quiet wait) when other processes used more than "
                         f"{CONTENTION} cores during it, up to this many times in all; every attempt is recorded")
    ap.add_argument("--keep_outputs", action="store_true", help="keep the runs' output dirs")
    args = ap.parse_args()

    plan = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in plan if s not in SIDES]
    if bad:
        ap.error(f"--only: unknown side(s) {bad}; choose from {SIDES}")
    plan = [s for s in SIDES if s in plan]  # fixed order
    peak = machine_peak(args.peak_json)
    print_peak(peak)
    data_path = write_pairs(Path(args.data_dir) / "dpo.jsonl", args.pairs, args.data_seed)
    args.model_dir = default_model_dir(args.model_dir)
    n_params = model_params(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    common = [
        "--data", str(data_path), "--model_dir", args.model_dir,
        "--steps", str(args.steps), "--batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate), "--beta", str(args.beta), "--loss_type", "sigmoid",
        "--max_length", str(args.max_length), "--seed", str(args.seed), "--precision", args.precision,
    ] + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])

    sides: dict[str, dict] = {}
    trl_dump = work / "trl_tokens.json"
    for side in plan:
        out_json = work / f"{side}.json"
        if side.startswith("trl"):
            if not Path(args.bench_python).exists():
                print(f"{args.bench_python} missing: run `bash benchmarks/setup_bench_env.sh` first")
                return 2
            cmd = [args.bench_python, str(HERE / "trl_dpo_runner.py")] + common
            if side == "trl":
                cmd += ["--dump_tokens", str(trl_dump)]
        else:
            cmd = [sys.executable, str(HERE / "posttrain_dpo_runner.py")] + common
            cmd += ["--max_prompt_length", str(args.max_prompt_length)]
            if args.posttrain_padding_free:
                cmd.append("--padding_free")
        if side.endswith("_precompute"):
            cmd.append("--precompute_ref_log_probs")
        cmd += ["--out", str(out_json), "--output_dir", str(work / f"{side}-run")]
        run, attempt, contended = run_side_quietly(side, cmd, work / f"{side}.log", out_json, args.wait_quiet,
                                                   args.attempts)
        if run["rc"] != 0:
            return run["rc"]
        res = json.loads(out_json.read_text())
        res["attempts"] = attempt
        res["contended_attempts"] = contended
        losses = [st["loss"] for st in res.get("per_step", []) if st.get("loss") is not None]
        res["mean_loss"] = sum(losses) / len(losses) if losses else None
        res["steady_steps_per_second"] = (res.get("steady") or {}).get("steps_per_second")
        res["steady_tokens_per_second"] = (res.get("steady") or {}).get("tokens_per_second")
        res["median_step_seconds"] = median(st.get("step_seconds") or None for st in res.get("per_step", []))
        res["first_loss_minus_ln2"] = None if res.get("first_loss") is None else res["first_loss"] - LN2
        # policy forward + backward on every input token; the reference forward too unless precomputed
        tokens = res.get("num_tokens") or 0
        res["model_flops"] = model_flops(n_params, tokens, 0 if side.endswith("_precompute") else tokens)
        res["mfu"] = mfu(res["model_flops"], res.get("train_seconds"), peak, args.precision)
        sides[side] = record_process(res, run)

    token_check = None
    if trl_dump.exists():
        print("\n=== checking that both tools tokenised the pairs the same way")
        try:
            token_check = check_tokens(data_path, args.model_dir, trl_dump, args.max_length, args.max_prompt_length)
            print("    " + json.dumps(token_check))
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not lose the measured results
            print(f"    check not done: {type(exc).__name__}: {exc}")

    t = sides.get("trl")

    def ratio(side: str, key: str) -> float | None:
        p = sides.get(side)
        if t and p and t.get(key) and p.get(key) is not None:
            return p[key] / t[key]
        return None

    rows = [
        ("reference", "reference", "s"),
        ("optimizer steps", "steps", "d"),
        ("preference pairs", "pairs", "d"),
        ("input tokens (no padding)", "num_tokens", "d"),
        ("tokens incl. padding (TRL)", "num_padded_tokens", "d"),
        ("train seconds (step 1 start..last end)", "train_seconds", ".1f"),
        ("steps / s", "steps_per_second", ".4f"),
        ("pairs / s", "pairs_per_second", ".3f"),
        ("tokens / s", "tokens_per_second", ".1f"),
        ("steps / s, steps 2..N", "steady_steps_per_second", ".4f"),
        ("median step seconds", "median_step_seconds", ".2f"),
        ("tokens / s, steps 2..N", "steady_tokens_per_second", ".1f"),
        ("peak RSS (GiB)", "peak_rss_gib", ".2f"),
        (f"MFU = (6N + 2N ref) x tokens / s / {args.precision} peak", "mfu", ".1%"),
        ("step-0 loss (first step, logged)", "first_loss", ".6f"),
        ("step-0 loss - ln 2", "first_loss_minus_ln2", "+.1e"),
        ("last loss", "last_loss", ".4f"),
        ("mean loss over the steps", "mean_loss", ".4f"),
        ("reference precompute seconds (not in train s)", "precompute_seconds", ".1f"),
        ("process wall seconds (incl. load/save)", "wall_seconds_with_startup", ".1f"),
        ("process CPU seconds (incl. load/save)", "process_cpu_seconds", ".1f"),
        ("cores used by other processes (contention)", "other_cores_busy_during", ".2f"),
    ]
    no_ratio = {"reference", "steps", "pairs", "first_loss", "first_loss_minus_ln2", "last_loss", "mean_loss",
                "other_cores_busy_during", "precompute_seconds", "num_padded_tokens", "mfu"}
    compared = [s for s in plan if s != "trl"]
    header = ["", LABELS["trl"]]
    for s in compared:
        header += [LABELS[s], "/ TRL"]
    table = []
    for label, key, spec in rows:
        line = [label, fmt(t.get(key) if t else None, spec)]
        for s in compared:
            r = None if key in no_ratio else ratio(s, key)
            p = sides.get(s)
            line += [fmt(p.get(key) if p else None, spec), fmt(r, ".2f") + ("x" if r is not None else "")]
        table.append(line)

    def loss0_ok(side: str) -> bool | None:
        s_ = sides.get(side)
        return None if not s_ or s_.get("first_loss") is None else abs(s_["first_loss"] - LN2) <= LOSS0_TOLERANCE

    targets = []
    verdicts: dict[str, dict] = {}
    for s in compared:
        speed, mem = ratio(s, "steps_per_second"), ratio(s, "peak_rss_kib_wait4")
        equal_loss = None if loss0_ok("trl") is None or loss0_ok(s) is None else (loss0_ok("trl") and loss0_ok(s))
        speed_ok = None if speed is None or equal_loss is None else (speed >= TARGET_SPEEDUP and equal_loss)
        mem_ok = None if mem is None else mem <= TARGET_MEMORY
        verdicts[s] = {"steps_per_second_ratio": speed, "peak_rss_ratio": mem, "step0_loss_equal_ln2": equal_loss,
                       "speed_met": speed_ok, "memory_met": mem_ok}
        name = LABELS[s]
        targets.append((f"{name}: steps/s >= {TARGET_SPEEDUP:g}x TRL, equal step-0 loss",
                        fmtx(speed) + ("" if equal_loss is None else
                                                    f", step-0 losses {'both' if equal_loss else 'NOT both'} ln 2"),
                        verdict(speed_ok)))
        targets.append((f"{name}: peak RSS <= {TARGET_MEMORY:g}x TRL", fmtx(mem), verdict(mem_ok)))
    for s in plan:
        ok = loss0_ok(s)
        targets.append((f"{LABELS[s]}: step-0 loss = ln 2 (+-{LOSS0_TOLERANCE:g})",
                        fmt(sides[s].get("first_loss_minus_ln2"), "+.1e"), verdict(ok)))
    if token_check:
        same = token_check["identical_but_trl_trailing_newline"] == token_check["pairs_trl"] == \
            token_check["pairs_posttrain"]
        targets.append(("same tokens (but TRL's trailing \\n after <|im_end|>)",
                        f"{token_check['identical_but_trl_trailing_newline']}/{token_check['pairs_trl']} pairs",
                        verdict(same)))

    title = (f"DPO benchmark - SmolLM2-135M-Instruct, {precision_label(args.precision, args.gradient_checkpointing)} "
             f"on both, CPU x{os.cpu_count()}, {args.steps} steps x "
             f"{args.batch_size} pairs, sigmoid beta {args.beta}, lr {args.learning_rate}, seed {args.seed}, "
             f"max_length {args.max_length}")
    print_tables(title, header, table, targets, width=160)
    warn_contention(sides.values())

    result = {
        **result_header("dpo", command=True, peak=peak),
        "config": {
            "model_dir": args.model_dir, "dtype": "float32", "precision": args.precision, "steps": args.steps,
            "n_params": n_params,
            "mfu_formula": "(6 * n_params * policy tokens + 2 * n_params * reference tokens) / train seconds / peak"
                           " (reference tokens 0 with precompute: that pass is outside the train seconds)",
            "pairs_per_step": args.batch_size, "gradient_accumulation_steps": 1,
            "learning_rate": args.learning_rate, "lr_scheduler": "linear, no warmup", "seed": args.seed,
            "loss_type": "sigmoid", "beta": args.beta, "max_length": args.max_length,
            "max_prompt_length": {"posttrain": args.max_prompt_length, "trl": "n/a (not an option in TRL 1.x)"},
            "reference": "separate frozen copy of the starting model (both tools' default without LoRA)",
            "padding": {"trl": "right-padded batch of 2B rows",
                        "posttrain": "padding-free" if args.posttrain_padding_free else "right-padded batch of 2B rows"},
            "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.precision == "bf16",
            "data": f"posttrain.demo.tasks.generate_preferences(seed={args.data_seed}, n_train={args.pairs}, n_eval=0)",
        },
        "sides": sides,
        "token_check": token_check,
        "targets": {"steps_per_second_ratio_min": TARGET_SPEEDUP, "peak_rss_ratio_max": TARGET_MEMORY,
                    "step0_loss": LN2, "step0_loss_tolerance": LOSS0_TOLERANCE, "per_side": verdicts},
    }
    results_file = write_results(args.results or results_path("dpo", args.precision, args.gradient_checkpointing),
                                 result)
    print(f"\nresults: {results_file}\nlogs: {work}/*.log")
    if not args.keep_outputs:
        for side in plan:
            shutil.rmtree(work / f"{side}-run", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
