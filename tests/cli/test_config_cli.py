"""Config and command line: TRL-compatible flags, YAML, and unknown keys as errors (pitfall 22)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from posttrain.cli import main, parse_config
from posttrain.config import ConfigError, SFTConfig


def test_trl_sft_command_line_parses():
    """A TRL `trl sft ...` command line runs with the program name changed."""
    argv = ("--model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --dataset_train_split train "
            "--learning_rate 2.0e-5 --num_train_epochs 1 --packing --per_device_train_batch_size 2 "
            "--gradient_accumulation_steps 8 --gradient_checkpointing --eos_token '<|im_end|>'".split())
    argv = [a for a in argv if a not in ("--eos_token", "'<|im_end|>'")]
    cfg = parse_config(SFTConfig, argv + ["--output_dir", "Qwen2-0.5B-SFT", "--logging_steps", "25",
                                          "--use_peft", "--lora_r", "32", "--lora_alpha", "16",
                                          "--lora_target_modules", "q_proj", "v_proj", "--bf16", "True",
                                          "--report_to", "none", "--torch_dtype", "bfloat16"])
    assert cfg.model_name_or_path == "Qwen/Qwen2-0.5B"
    assert cfg.dataset_split == "train"
    assert cfg.learning_rate == pytest.approx(2e-5)
    assert cfg.packing is True and cfg.gradient_checkpointing is True and cfg.use_peft is True
    assert cfg.per_device_train_batch_size == 2 and cfg.gradient_accumulation_steps == 8
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.bf16 is True and cfg.dtype == "bfloat16"


def test_pitfall_22_unknown_flag_names_closest_key():
    with pytest.raises(ConfigError, match=r"--learnig_rate.*did you mean --learning_rate"):
        parse_config(SFTConfig, ["--learnig_rate", "1e-5"])


def test_pitfall_22_flag_prefix_is_not_silently_accepted():
    """argparse would take `--learning_rat` as an abbreviation of --learning_rate; we refuse."""
    with pytest.raises(ConfigError, match="did you mean --learning_rate"):
        parse_config(SFTConfig, ["--learning_rat", "1e-5"])


def test_pitfall_22_unknown_yaml_key_names_closest_key(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 1e-5\nper_device_train_bach_size: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key per_device_train_bach_size; "
                                          r"did you mean per_device_train_batch_size"):
        parse_config(SFTConfig, ["--config", str(cfg_file)])


def test_yaml_values_typed_and_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-5 as a string; the config must still be a float.
    cfg_file.write_text("learning_rate: 1e-5\nmax_steps: 7\npacking: true\nlora_target_modules: q_proj\n"
                        "dataset_train_split: validation\n")
    cfg = parse_config(SFTConfig, ["--config", str(cfg_file), "--max_steps", "9"])
    assert cfg.learning_rate == pytest.approx(1e-5) and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 9 and cfg.packing is True
    assert cfg.lora_target_modules == ["q_proj"] and cfg.dataset_split == "validation"


def test_yaml_bad_value_type_is_named(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("max_steps: lots\n")
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        parse_config(SFTConfig, ["--config", str(cfg_file)])


def test_cli_unknown_flag_exits_2_with_one_line(capsys):
    assert main(["sft", "--max_step", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: posttrain sft: unknown flag --max_step; did you mean --max_steps?"]


def test_cli_unknown_command_suggests(capsys):
    assert main(["stf"]) == 2
    assert "did you mean sft" in capsys.readouterr().err


def test_help_is_fast_and_light():
    """`posttrain --help` answers without importing torch/transformers."""
    code = ("import sys, time; t=time.time(); from posttrain.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print(time.time()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "sft" in out.stdout
    assert float(out.stdout.strip().splitlines()[-1]) < 1.0


def test_losses_import_needs_only_torch():
    code = "import sys, posttrain.losses; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
