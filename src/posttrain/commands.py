"""The command registry and the flag/YAML parser, shared by the CLI, the pipeline and the demo.

A leaf (imports only config), so `pipeline/` and `demo/` read the registry and parse their own
arguments without importing `cli`, which imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import FLAG_ALIASES, ConfigError, check_keys, field_names, unknown_key_error

# command -> (module, config class name, function name, one-line description)
TRAIN_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "sft": ("posttrain.recipes.sft", "SFTConfig", "sft", "supervised fine-tuning on chat, prompt-completion or text data"),
    "reward": ("posttrain.recipes.reward", "RewardConfig", "reward", "train a reward model on preference pairs"),
    "dpo": ("posttrain.recipes.dpo", "DPOConfig", "dpo", "direct preference optimisation and its variants"),
    "kto": ("posttrain.recipes.kto", "KTOConfig", "kto", "KTO on unpaired desirable/undesirable completions"),
    "grpo": ("posttrain.recipes.grpo", "GRPOConfig", "grpo", "GRPO: sample groups, reward them, group-relative policy gradient"),
    "rloo": ("posttrain.recipes.rloo", "RLOOConfig", "rloo", "REINFORCE leave-one-out with the KL folded into the reward"),
    "ppo": ("posttrain.recipes.ppo", "PPOConfig", "ppo", "PPO with a critic: reward-model score minus per-token KL, GAE"),
    "online-dpo": ("posttrain.recipes.online_dpo", "OnlineDPOConfig", "online_dpo",
                   "online DPO: two samples per prompt, ranked by a reward, DPO/IPO step on the pair"),
    # not training, but the same table drives the CLI and the pipeline's stages
    "eval": ("posttrain.eval.generation_eval", "EvalConfig", "evaluate",
             "generate on held-out prompts; reward, accuracy, win rate and KL against a --baseline"),
}
TOOL_COMMANDS: dict[str, str] = {
    "validate": "check a data file: format, row-numbered errors, truncation report",
    "mask-preview": "show which tokens of each example are trained",
    "report": "rebuild report.html of a run or pipeline directory from its metrics.jsonl",
    "pipeline": "run stages (sft → reward → ppo|grpo|dpo → eval) from one YAML; finished stages are cached",
    "demo": "the full RLHF pipeline on the embedded SmolLM2-135M-Instruct, before/after table (--quick: tiny model)",
}


def _normalise_flags(argv: list[str]) -> list[str]:
    """Rewrite TRL/transformers alias flags (e.g. --dataset_train_split) to posttrain's names."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            name = FLAG_ALIASES.get(name, name)
            arg = f"--{name}{eq}{value}"
        out.append(arg)
    return out


def _load_yaml(path: str, config_cls: type) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return check_keys(values, config_cls, path)


def parse_config(config_cls: type, argv: list[str], prog: str = "posttrain") -> Any:
    """Build a config from `--config FILE` (YAML) overridden by flags; unknown keys are errors."""
    from transformers import HfArgumentParser

    argv = _normalise_flags(argv)
    yaml_values: dict[str, Any] = {}
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        rest = []
        it = iter(argv)
        for arg in it:
            if arg == "--config":
                path = next(it, None)
                if path is None:
                    raise ConfigError("--config needs a file path")
                yaml_values.update(_load_yaml(path, config_cls))
            elif arg.startswith("--config="):
                yaml_values.update(_load_yaml(arg.split("=", 1)[1], config_cls))
            else:
                rest.append(arg)
        argv = rest
    # allow_abbrev=False: a misspelt prefix must be an error, never silently another flag.
    parser = HfArgumentParser(config_cls, prog=prog, allow_abbrev=False)
    for action in parser._actions:
        # `bool | None` fields (e.g. --bf16, default: decide by hardware) must accept a bare flag too.
        if getattr(action.type, "__name__", "") == "string_to_bool" and action.nargs is None:
            action.nargs, action.const = "?", True
    parser.set_defaults(**yaml_values)
    (config, remaining) = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    for arg in remaining:
        if arg.startswith("-"):
            raise unknown_key_error(arg.lstrip("-").split("=")[0], field_names(config_cls), prog, flag=True)
        raise ConfigError(f"{prog}: unexpected argument {arg!r} (flags take the form --name value)")
    return config
