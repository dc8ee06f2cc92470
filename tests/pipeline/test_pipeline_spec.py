"""Pipeline YAML → stages: defaults, references, aliases, relative paths, errors, the content hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import ConfigError
from posttrain.pipeline import load_pipeline
from posttrain.pipeline.fingerprint import hash_payload, payload_hash


def _spec(tmp_path: Path, **stages) -> dict:
    return {"output_dir": str(tmp_path / "run"), "defaults": {"seed": 9, "beta": 0.2}, "stages": stages}


def test_defaults_apply_where_the_command_has_the_key_and_stage_keys_win(tmp_path):
    p = load_pipeline(_spec(tmp_path, sft={"max_steps": 3}, dpo={"model": "sft", "seed": 1}))
    sft, dpo = p.stages
    assert sft.config.seed == 9 and not hasattr(sft.config, "beta")  # SFT has no beta: not applied
    assert dpo.config.seed == 1 and dpo.config.beta == 0.2
    assert sft.config.output_dir == str(tmp_path / "run" / "sft")
    assert dpo.config.model_name_or_path == str(tmp_path / "run" / "sft")
    assert dpo.references == {"model_name_or_path": "sft"}


def test_same_command_twice_and_reward_references(tmp_path):
    p = load_pipeline(_spec(tmp_path, sft={}, rm={"command": "reward", "model": "sft"},
                            grpo={"model": "sft", "reward_funcs": ["accuracy", "rm"]},
                            rloo={"model_name_or_path": "grpo", "reward_model": "rm", "ref_model": "sft"}))
    grpo, rloo = p.stage("grpo"), p.stage("rloo")
    assert p.stage("rm").command == "reward"
    assert grpo.config.reward_funcs == ["accuracy", str(tmp_path / "run" / "rm")]
    assert grpo.references == {"model_name_or_path": "sft", "reward_funcs[1]": "rm"}
    assert rloo.config.reward_model_path == str(tmp_path / "run" / "rm")
    assert rloo.config.ref_model_name_or_path == str(tmp_path / "run" / "sft")
    assert rloo.upstream == ["grpo", "rm", "sft"]


def test_relative_paths_are_found_beside_the_yaml(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "rewards.py").write_text("def r(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("stages:\n  grpo:\n    dataset_name: data/train.jsonl\n"
                         "    reward_funcs: [rewards.py:r, format]\n    model: HuggingFaceTB/SmolLM2-135M\n")
    p = load_pipeline(yaml_path)
    cfg = p.stage("grpo").config
    assert cfg.dataset_name == str(tmp_path / "data" / "train.jsonl")
    assert cfg.reward_funcs == [f"{tmp_path / 'rewards.py'}:r", "format"]
    assert cfg.model_name_or_path == "HuggingFaceTB/SmolLM2-135M"  # a hub id is left alone
    assert p.output_dir == Path("runs/run")  # default: runs/<yaml stem>


@pytest.mark.parametrize(("spec", "message"), [
    ({"stages": {"sft": {"lerning_rate": 1e-4}}}, "stage 'sft': unknown key lerning_rate; did you mean learning_rate?"),
    ({"stages": {"sft": {"command": "stf"}}}, "stage 'sft': unknown command 'stf'; did you mean sft?"),
    ({"stages": {"sft": {}}, "stagse": {}}, "unknown key stagse; did you mean stages?"),
    ({"defaults": {"sed": 1}, "stages": {"sft": {}}}, "defaults (no stage has it): unknown key sed; did you mean seed?"),
    ({"stages": {"dpo": {"model": "sft"}, "sft": {}}}, "stage 'dpo': model_name_or_path: stage 'sft' comes later"),
    ({"stages": {"sft": {}, "grpo": {"model": "sft", "reward_model": "sft"}}},
     "stage 'grpo': reward_model_path: stage 'sft' is a sft stage, not a reward model"),
    ({"stages": {"sft": {"output_dir": "x"}}}, "stage 'sft': output_dir is set by the pipeline"),
    ({"stages": {"sft": {"max_steps": "many"}}}, "stage 'sft': max_steps: expected int"),
    ({"stages": {}}, "`stages:` must be a non-empty mapping"),
    ({"stages": {"sft": {}, "dpo": {"model": "sft", "model_name_or_path": "sft"}}},
     "model and model_name_or_path both given"),
])
def test_bad_pipelines_are_one_line_errors_naming_stage_and_key(spec, message):
    with pytest.raises(ConfigError) as info:
        load_pipeline(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  sft: {max_steps: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="missing.yaml: pipeline file not found"):
        load_pipeline(tmp_path / "missing.yaml")


def test_hash_covers_config_data_content_and_upstream_but_not_output_dir(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')

    def hashes(out="run", lr=1e-4, upstream_lr=1e-4):
        p = load_pipeline({"output_dir": str(tmp_path / out),
                           "stages": {"sft": {"dataset_name": str(data), "learning_rate": upstream_lr},
                                      "dpo": {"model": "sft", "dataset_name": str(data), "learning_rate": lr}}})
        up = payload_hash(hash_payload(p.stages[0], {}))
        return up, payload_hash(hash_payload(p.stages[1], {"sft": up}))

    base = hashes()
    assert hashes() == base  # deterministic
    assert hashes(out="elsewhere") == base  # the output tree's location is not part of the result
    assert hashes(lr=2e-4)[0] == base[0] and hashes(lr=2e-4)[1] != base[1]
    assert all(a != b for a, b in zip(hashes(upstream_lr=3e-4), base))  # upstream change → downstream changes
    data.write_text('{"text": "b"}\n')
    assert all(a != b for a, b in zip(hashes(), base))  # same path, new content


def test_hash_covers_a_local_reward_function_module(tmp_path):
    module = tmp_path / "my_rewards.py"
    module.write_text("def r(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")

    def digest():
        p = load_pipeline({"stages": {"grpo": {"reward_funcs": [f"{module}:r"]}}})
        return payload_hash(hash_payload(p.stages[0], {}))

    before = digest()
    module.write_text("def r(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    assert digest() != before
