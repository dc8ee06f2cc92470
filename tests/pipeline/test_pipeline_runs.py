"""The pipeline end to end on a tiny model: sft → reward → grpo (rewarded by the reward stage) → dpo.
Caching, reruns of changed stages and their dependents, --force, interrupt + resume, the CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.pipeline import plan_pipeline, run_pipeline
from posttrain.pipeline.spec import load_pipeline
from tests.pipeline.conftest import small_pipeline

REPO = Path(__file__).resolve().parents[2]
RECIPES = {"sft": "posttrain.recipes.sft", "reward": "posttrain.recipes.reward", "grpo": "posttrain.recipes.grpo",
           "dpo": "posttrain.recipes.dpo"}


def _statuses(spec, force=None) -> dict[str, str]:
    return {p.stage.name: p.status for p in plan_pipeline(load_pipeline(spec), force=force)}


def _stage_record(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "stage.json").read_text())


def _forbid_recipes(monkeypatch):
    """Any recipe call fails the test: a cached stage must not train."""
    import importlib

    for command, module in RECIPES.items():
        def boom(*a, _c=command, **k):
            raise AssertionError(f"recipe {_c} was called for a cached stage")
        monkeypatch.setattr(importlib.import_module(module), command, boom)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir, task_data):
    out = tmp_path_factory.mktemp("pipeline-run") / "run"
    spec = small_pipeline(out, tiny_dir, task_data)
    return spec, run_pipeline(spec), out


def test_first_run_runs_every_stage_in_order_and_records_it(finished):
    spec, result, out = finished
    assert result.ran == ["sft", "reward", "grpo", "dpo"] and result.stopped_at is None
    for stage in result.ran:
        record = _stage_record(out, stage)
        assert record["finished"] is True and len(record["hash"]) == 64
        assert (out / stage / "metrics.jsonl").exists()
    # the grpo stage was rewarded by the reward stage's model and started from the sft model
    grpo_config = yaml.safe_load((out / "grpo" / "config.yaml").read_text())
    assert grpo_config["reward_model_path"] == str(out / "reward")
    assert grpo_config["model_name_or_path"] == str(out / "sft")
    assert (out / "reward" / "config.json").exists() and (out / "dpo" / "model.safetensors").exists()
    record = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["sft", "reward", "grpo", "dpo"]
    assert all(s["finished"] for s in record["stages"])


def test_second_run_skips_every_finished_stage(finished, monkeypatch, capsys):
    spec, _, out = finished
    before = {s: (out / s / "stage.json").stat().st_mtime_ns for s in RECIPES}
    weights = (out / "dpo" / "model.safetensors").stat().st_mtime_ns
    _forbid_recipes(monkeypatch)
    result = run_pipeline(spec)
    assert result.ran == [] and [p.action for p in result.plans] == ["cached"] * 4
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in RECIPES} == before
    assert (out / "dpo" / "model.safetensors").stat().st_mtime_ns == weights
    printed = capsys.readouterr().out
    assert "4 cached, 0 to run" in printed
    assert "grpo    grpo     model: sft; reward_model: reward; data: " in printed


def test_a_changed_key_reruns_that_stage_and_what_reads_it(finished):
    spec, _, _ = finished
    grpo_changed = copy.deepcopy(spec)
    grpo_changed["stages"]["grpo"]["learning_rate"] = 5e-4
    assert _statuses(grpo_changed) == {"sft": "cached", "reward": "cached",
                                       "grpo": "run (key learning_rate changed)", "dpo": "cached"}
    reward_changed = copy.deepcopy(spec)
    reward_changed["stages"]["reward"]["max_steps"] = 1
    assert _statuses(reward_changed) == {"sft": "cached", "reward": "run (key max_steps changed)",
                                         "grpo": "run (input reward reruns)", "dpo": "cached"}
    sft_changed = copy.deepcopy(spec)
    sft_changed["defaults"]["seed"] = 4  # a default reaches every stage
    assert all(s.startswith("run") for s in _statuses(sft_changed).values())


def test_force_reruns_that_stage_and_every_later_one(finished, capsys):
    spec, _, out = finished
    assert _statuses(spec, force="reward") == {"sft": "cached", "reward": "forced", "grpo": "forced",
                                               "dpo": "forced"}
    started = _stage_record(out, "dpo")["started_at"]
    (out / "dpo" / "marker").write_text("the forced stage starts from a clean dir")
    result = run_pipeline(spec, force="dpo")
    assert result.ran == ["dpo"]
    assert not (out / "dpo" / "marker").exists()
    assert _stage_record(out, "dpo")["finished"] and _stage_record(out, "dpo")["started_at"] >= started
    with pytest.raises(Exception, match="no stage 'dop'; did you mean dpo?"):
        run_pipeline(spec, force="dop")


def test_moved_tree_stays_cached_and_a_changed_stage_reruns_alone(finished):
    import shutil

    spec, _, out = finished
    moved = copy.deepcopy(spec)
    moved["output_dir"] = str(out.parent / "moved")
    shutil.copytree(out, moved["output_dir"])
    assert set(_statuses(moved).values()) == {"cached"}  # the hash never depends on where the tree lives
    moved["stages"]["grpo"]["learning_rate"] = 5e-4
    result = run_pipeline(moved)
    assert result.ran == ["grpo"]  # dpo reads sft, not grpo: it stays cached
    assert _stage_record(Path(moved["output_dir"]), "grpo")["finished"]


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path, tiny_dir, task_data, monkeypatch, capsys):
    """SIGINT during sft step 3 → the session checkpoints step 3 and stops; the pipeline stops
    there without marking sft finished; the next run resumes sft at step 3 and goes on."""
    from posttrain.engine.session import TrainingSession

    spec = small_pipeline(tmp_path / "run", tiny_dir, task_data)
    spec["stages"] = {"sft": {**spec["stages"]["sft"], "max_steps": 5, "save_steps": 2},
                      "reward": spec["stages"]["reward"]}
    original = TrainingSession.finish_step

    def interrupt_in_step_3(self, step, **kw):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; the session's handler catches it
        return original(self, step, **kw)

    monkeypatch.setattr(TrainingSession, "finish_step", interrupt_in_step_3)
    first = run_pipeline(spec)
    assert first.stopped_at == "sft" and first.ran == []
    out = tmp_path / "run"
    assert _stage_record(out, "sft")["finished"] is False
    assert (out / "sft" / "checkpoints" / "step-000003").is_dir()
    assert not (out / "reward").exists()

    monkeypatch.setattr(TrainingSession, "finish_step", original)
    assert _statuses(spec) == {"sft": "resume from step 3", "reward": "run (new)"}
    capsys.readouterr()
    second = run_pipeline(spec)
    assert second.ran == ["sft", "reward"]
    assert "resumed from" in capsys.readouterr().out
    record = _stage_record(out, "sft")
    assert record["finished"] and record["resumed_from_step"] == 3
    assert json.loads((out / "sft" / "run_summary.json").read_text())["steps"] == 2  # steps 4 and 5 only
    steps = [json.loads(line)["step"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_interrupted_stage_with_a_changed_config_starts_over(tmp_path, tiny_dir, task_data):
    spec = small_pipeline(tmp_path / "run", tiny_dir, task_data)
    spec["stages"] = {"sft": spec["stages"]["sft"]}
    sft_dir = tmp_path / "run" / "sft"
    (sft_dir / "checkpoints" / "step-000001").mkdir(parents=True)
    (sft_dir / "checkpoints" / "step-000001" / "trainer_state.json").write_text('{"step": 1}')
    (sft_dir / "stage.json").write_text(json.dumps({"hash": "0" * 64, "finished": False}))
    assert _statuses(spec)["sft"] == "run (changed)"
    result = run_pipeline(spec)
    assert result.ran == ["sft"] and not (sft_dir / "checkpoints" / "step-000001").exists()


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO)


def test_cli_dry_run_prints_the_plan_and_bad_keys_are_one_line_errors(finished, tmp_path):
    spec, _, out = finished
    spec = copy.deepcopy(spec)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _cli("pipeline", path, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage   command  reads" in proc.stdout and "4 cached, 0 to run" in proc.stdout
    forced = _cli("pipeline", path, "--dry_run", "--force", "grpo")
    assert "grpo    grpo" in forced.stdout and forced.stdout.count("forced") == 2
    spec["stages"]["dpo"]["bta"] = 0.1
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bad = _cli("pipeline", path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {path}: stage 'dpo': unknown key bta; did you mean beta?"


def test_added_ppo_and_eval_stages_run_on_the_cached_ones(finished, task_data):
    """The RLHF shape: ppo (policy sft, rewarded and its critic initialised by the reward stage) →
    eval (ppo against sft); the existing stages stay cached and the pipeline report is built."""
    import shutil

    spec, _, out = finished
    grown = copy.deepcopy(spec)
    grown["output_dir"] = str(out.parent / "grown")
    shutil.copytree(out, grown["output_dir"])
    grown["stages"]["ppo"] = {"model": "sft", "reward_model": "reward", "dataset_name": str(task_data["prompts"]),
                              "max_completion_length": 6, "num_ppo_epochs": 1, "max_steps": 1,
                              "per_device_train_batch_size": 4, "save_steps": 0}
    grown["stages"]["final"] = {"command": "eval", "model": "ppo", "baseline": "sft", "reward_model": "reward",
                                "dataset_name": str(task_data["prompts"]), "max_completion_length": 6,
                                "num_samples": 1}
    result = run_pipeline(grown)
    assert result.ran == ["ppo", "final"]
    grown_dir = Path(grown["output_dir"])
    record = json.loads((grown_dir / "final" / "eval.json").read_text())
    assert record["model"] == str(grown_dir / "ppo") and record["baseline"] == str(grown_dir / "sft")
    assert "sampled/kl_k1" in record["comparison"]
    assert result.report_path == grown_dir / "report.html" and result.report_path.exists()
    with pytest.raises(Exception, match="stage 'final' is an eval stage and writes no model"):
        load_pipeline({**grown, "stages": {**grown["stages"], "after": {"command": "dpo", "model": "final"}}})
