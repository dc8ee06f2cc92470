"""Every example pipeline in examples/ parses, resolves and points at bundled data (fast), the
bundled data is exactly what the seeded script writes, and each example runs end to end with the
embedded default swapped for a tiny model (slow)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.pipeline import plan_pipeline, run_pipeline
from posttrain.pipeline.spec import load_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
EXPECTED = {"rlhf.yaml": ["sft", "reward", "ppo", "eval"], "dpo.yaml": ["dpo", "eval"], "grpo.yaml": ["grpo", "eval"],
            "ppo_sentiment.yaml": ["reward", "ppo", "eval"]}


def _example_module(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


def test_the_four_workflows_are_there():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_parses_resolves_and_reads_bundled_files(path, tmp_path):
    pipeline = load_pipeline(path, output_dir=tmp_path / "out")
    assert [s.name for s in pipeline.stages] == EXPECTED[path.name]
    for stage in pipeline.stages:
        cfg = stage.config
        assert cfg.model_name_or_path is None or stage.references.get("model_name_or_path"), \
            f"{path.name}: {stage.name} should start from the embedded default or an earlier stage"
        assert Path(cfg.dataset_name).is_file() and Path(cfg.dataset_name).parent == EXAMPLES / "data"
        for spec in getattr(cfg, "reward_funcs", []):
            module = spec.rpartition(":")[0]
            assert ":" not in spec or Path(module).is_file() or stage.references, spec
    plans = plan_pipeline(pipeline)
    assert [p.action for p in plans] == ["run"] * len(plans)


def test_bundled_example_data_is_what_the_seeded_script_writes(tmp_path):
    _example_module("make_data").main(tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert written == sorted(p.name for p in (EXAMPLES / "data").glob("*.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes(), name


def test_example_arithmetic_files_share_no_problem():
    def problems(name):
        rows = [json.loads(x) for x in (EXAMPLES / "data" / name).read_text().splitlines()]
        return {(r.get("messages") or r["prompt"])[0]["content"] for r in rows}

    held = problems("arithmetic_eval.jsonl")
    for name in ("arithmetic_sft.jsonl", "arithmetic_preferences.jsonl", "arithmetic_prompts.jsonl"):
        assert not held & problems(name)


def test_positivity_counts_positive_and_negative_words():
    positivity = _example_module("sentiment").positivity
    # 2 positive (wonderful, happily), 0 negative → (2-0)/2 = 1; 1 and 2 (great; dull, would not)
    # → (1-2)/3; none → 0/1 = 0
    texts = ["It was wonderful and I would happily go back.", "Great view but dull food, would not return.",
             "It is a building."]
    scores = positivity(None, [[{"role": "assistant", "content": t}] for t in texts])
    assert scores == pytest.approx([1.0, -1 / 3, 0.0])


def _shrunk(path: Path, model_dir: Path, out: Path) -> dict:
    """The example with the embedded default swapped for a tiny model and 2 steps per stage."""
    spec = yaml.safe_load(path.read_text())
    spec["output_dir"] = str(out)
    spec.setdefault("defaults", {})["model_name_or_path"] = str(model_dir)
    spec["defaults"]["disable_tqdm"] = True
    for stage in spec["stages"].values():
        if "max_steps" in stage:
            stage["max_steps"] = 2
        if "max_completion_length" in stage:
            stage["max_completion_length"] = 8
        stage.pop("eval_split_ratio", None)
    return spec


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_runs_end_to_end_on_a_tiny_model(path, tmp_path, tiny_dir):
    spec = _shrunk(path, tiny_dir, tmp_path / "run")
    result = run_pipeline(spec, base_dir=EXAMPLES)
    assert result.ran == EXPECTED[path.name] and result.stopped_at is None
    record = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert record["baseline"] is not None and "sampled/kl_k1" in record["comparison"]
    again = run_pipeline(spec, base_dir=EXAMPLES)
    assert again.ran == []
