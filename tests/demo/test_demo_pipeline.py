"""The demo: its pipeline resolves, its data is seeded and held out, the judge is exact, and
`posttrain demo --quick` runs every stage on a tiny model and prints the before/after table."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from posttrain.demo.run import DEMO_DIR, PIPELINE_FILE, QUICK_OVERRIDES, main, quick_spec
from posttrain.demo.tasks import exact_judge, write_files
from posttrain.pipeline import load_pipeline


def test_demo_pipeline_resolves_to_the_rlhf_stages(tmp_path):
    p = load_pipeline(yaml.safe_load(PIPELINE_FILE.read_text()), base_dir=DEMO_DIR, output_dir=tmp_path)
    assert [(s.name, s.command) for s in p.stages] == [
        ("sft", "sft"), ("reward", "reward"), ("sft_eval", "eval"), ("grpo", "grpo"), ("grpo_eval", "eval"), ("dpo", "dpo"),
        ("dpo_eval", "eval")]
    grpo, grpo_eval = p.stage("grpo"), p.stage("grpo_eval")
    assert grpo.references == {"model_name_or_path": "sft", "reward_model_path": "reward"}
    assert grpo_eval.start_keys == ["baseline"] and grpo_eval.config.judge == "posttrain.demo.tasks:exact_judge"
    assert p.stage("sft").config.model_name_or_path is None  # the embedded default


def test_quick_spec_swaps_the_model_and_shrinks_every_stage(tmp_path):
    spec = quick_spec(yaml.safe_load(PIPELINE_FILE.read_text()), tmp_path / "tiny")
    p = load_pipeline(spec, base_dir=DEMO_DIR, output_dir=tmp_path / "out")
    assert p.stage("sft").config.model_name_or_path == str(tmp_path / "tiny")
    assert p.stage("grpo_eval").config.baseline == str(tmp_path / "tiny")  # `start` follows the defaults
    for stage in p.stages:
        if stage.command != "eval":
            assert stage.config.max_steps == QUICK_OVERRIDES["max_steps"]
    assert p.stage("dpo_eval").config.max_eval_samples == QUICK_OVERRIDES["max_eval_samples"]


def test_bundled_demo_data_is_seeded_and_held_out_prompts_are_unseen(tmp_path):
    write_files(tmp_path)
    for path in (DEMO_DIR / "data").glob("*.jsonl"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name

    def problems(name):
        rows = [json.loads(x) for x in (DEMO_DIR / "data" / name).read_text().splitlines()]
        texts = [(r.get("messages") or r["prompt"])[0]["content"] for r in rows]
        return {re.search(r"\d+ [-+*] \d+", t).group(0) for t in texts}

    held = problems("eval_prompts.jsonl")
    assert len(held) == 64
    for name in ("sft_train.jsonl", "preferences.jsonl", "rl_prompts.jsonl"):
        assert not held & problems(name), name


def test_exact_judge_prefers_right_answers_then_the_right_number():
    right, unformatted, wrong = "7 + 5 = 12.\n#### 12", "7 + 5 = 12.", "#### 13"
    # right vs unformatted: 1; unformatted vs wrong: 1 (the number appears); wrong vs right: 0;
    # two right answers: a tie 0.5; "112" does not contain the number 12 on its own: a tie with wrong
    got = exact_judge(None, [right, unformatted, wrong, right, "#### 112"],
                      [unformatted, wrong, right, right, wrong], answer=["12"] * 5)
    assert got == [1.0, 1.0, 0.0, 0.5, 0.5]


@pytest.mark.slow
def test_demo_quick_runs_every_stage_and_prints_the_table(tmp_path, capsys):
    assert main(["--quick", "--output_dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "start (before training)" in out and "sft → grpo" in out and "sft → dpo" in out
    assert f"report: {tmp_path / 'demo' / 'report.html'}" in out
    record = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert [r["name"] for r in record["rows"]] == ["start (before training)", "sft", "sft → grpo", "sft → dpo"]
    assert all(r["kl"] is not None for r in record["rows"][1:])
    # a second run finds everything cached
    assert main(["--quick", "--output_dir", str(tmp_path / "demo")]) == 0
    assert "0 to run" in capsys.readouterr().out
