"""A pipeline YAML → an ordered list of stages, each with its command's config dataclass.

    output_dir: runs/rlhf            # one tree: runs/rlhf/<stage>/...
    defaults: {seed: 1, dtype: float32}   # applied to every stage whose command has the key
    stages:
      sft:    {dataset_name: data/sft.jsonl, max_steps: 40}
      reward: {model: sft, dataset_name: data/pairs.jsonl}
      ppo:    {model: sft, reward_model: reward, dataset_name: data/prompts.jsonl}
      final:  {command: eval, model: ppo, baseline: sft}

A stage is `name: {command: <cmd> (default: the name), <that command's keys>}`. A value in a
reference key (model_name_or_path, ref_model_name_or_path, reward_model_path, baseline,
value_model_path, or an entry of reward_funcs) equal to an EARLIER stage's name means that
stage's output dir; `start` there means the starting model (defaults' model_name_or_path, else
the embedded default). Commands come from `cli.TRAIN_COMMANDS`, so a new command is a new stage kind.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, check_keys, closest_key, field_names, unknown_key_error

TOP_LEVEL_KEYS = ("output_dir", "defaults", "stages")
# Keys whose value may name an earlier stage (its output dir is substituted).
REFERENCE_KEYS = ("model_name_or_path", "ref_model_name_or_path", "reward_model_path", "baseline",
                  "value_model_path")
LIST_REFERENCE_KEYS = ("reward_funcs",)  # each entry may name a reward stage
CALLABLE_KEYS = ("reward_funcs", "judge")  # `module:function` or `file.py:function` specs
# The short spellings, accepted in stages and defaults.
KEY_ALIASES = {"model": "model_name_or_path", "reward_model": "reward_model_path",
               "ref_model": "ref_model_name_or_path", "value_model": "value_model_path"}
# Set by the pipeline itself, never by the YAML.
MANAGED_KEYS = ("output_dir", "resume_from_checkpoint")
# In a reference key: the pipeline's starting model (defaults' model_name_or_path, else the
# embedded default), e.g. `baseline: start` to compare the final model with where it began.
START = "start"
# Commands whose output dir holds no model (cannot be referenced as one).
NON_MODEL_COMMANDS = ("eval",)


@dataclass
class Stage:
    name: str
    command: str
    config: Any  # the command's config dataclass, output_dir = <pipeline output_dir>/<name>
    references: dict[str, str] = field(default_factory=dict)  # "key" or "reward_funcs[i]" -> stage name
    start_keys: list[str] = field(default_factory=list)  # keys given as `start` (the starting model)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def upstream(self) -> list[str]:
        return sorted(set(self.references.values()))


@dataclass
class Pipeline:
    source: str  # the YAML path (or "<dict>") for messages
    output_dir: Path
    stages: list[Stage]
    raw: dict[str, Any]  # the mapping as given, saved beside the run for the record

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: no stage {name!r}" + _did_you_mean(name, [s.name for s in self.stages]))


def _did_you_mean(name: str, valid: list[str]) -> str:
    guess = closest_key(name, valid)
    return f"; did you mean {guess}?" if guess else f" (stages: {', '.join(valid)})"


def command_entry(command: str, where: str) -> tuple[str, type, str]:
    """(module name, config class, function name) of a TRAIN_COMMANDS entry."""
    from posttrain.commands import TRAIN_COMMANDS

    if command not in TRAIN_COMMANDS:
        raise ConfigError(f"{where}: unknown command {command!r}" + _did_you_mean(command, list(TRAIN_COMMANDS)))
    module_name, config_name, fn_name, _ = TRAIN_COMMANDS[command]
    config_cls = getattr(importlib.import_module("posttrain.config"), config_name, None)
    if config_cls is None:  # a command may keep its config beside its code
        config_cls = getattr(importlib.import_module(module_name), config_name)
    return module_name, config_cls, fn_name


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping with output_dir, defaults and stages")
    return values


def _is_path_key(key: str) -> bool:
    """Keys whose value may be a local file or dir, looked up beside the YAML first."""
    if key in ("output_dir", "run_name", "resume_from_checkpoint"):
        return False
    return key in REFERENCE_KEYS or key.endswith(("_name", "_path", "_file", "_dir"))


def _beside(value: str, base_dir: Path | None) -> str:
    """A relative path that exists beside the YAML is taken from there; anything else (a hub id,
    a path relative to the working directory) is left as written."""
    if base_dir is None or Path(value).is_absolute() or not (base_dir / value).exists():
        return value
    return str(base_dir / value)


def _reward_func_beside(spec: str, base_dir: Path | None) -> str:
    """`path/to/file.py:fn` (a reward function or judge) resolved beside the YAML; built-ins and
    module names unchanged."""
    module, sep, attr = spec.rpartition(":")
    if sep and module.endswith(".py"):
        return f"{_beside(module, base_dir)}:{attr}"
    return _beside(spec, base_dir) if not sep else spec


def _aliased(values: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in values.items():
        canonical = KEY_ALIASES.get(str(key), str(key))
        if canonical in out:
            raise ConfigError(f"{where}: {given[canonical]} and {key} both given; keep one")
        given[canonical] = str(key)
        if canonical in MANAGED_KEYS:
            raise ConfigError(f"{where}: {canonical} is set by the pipeline (each stage writes to "
                              "<output_dir>/<stage>; an interrupted stage resumes by itself)")
        out[canonical] = value
    return out


def load_pipeline(source: str | Path | dict[str, Any], *, base_dir: str | Path | None = None,
                  output_dir: str | Path | None = None) -> Pipeline:
    """Parse and resolve a pipeline: every stage's config built and checked, references resolved.

    `source`: a YAML path or an already-loaded mapping (then `base_dir` says where its relative
    paths live). `output_dir` overrides the file's."""
    if isinstance(source, dict):
        raw, where = dict(source), "<pipeline>"
    else:
        raw, where = read_yaml(source), str(source)
        base_dir = Path(source).resolve().parent if base_dir is None else base_dir
    base = Path(base_dir) if base_dir is not None else None
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_key_error(str(key), list(TOP_LEVEL_KEYS), where)
    default_stem = Path(where).stem if where != "<pipeline>" else "pipeline"
    out = Path(output_dir or raw.get("output_dir") or f"runs/{default_stem}")
    defaults = _aliased(raw.get("defaults") or {}, f"{where}: defaults")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{where}: `stages:` must be a non-empty mapping of stage name -> keys")

    stages: list[Stage] = []
    defaults_used: set[str] = set()
    for name, keys in stages_raw.items():
        name = str(name)
        at = f"{where}: stage {name!r}"
        if not name or "/" in name or name.startswith(".") or name == START:
            raise ConfigError(f"{at}: a stage name must be a plain directory name other than {START!r}")
        if keys is None:
            keys = {}
        if not isinstance(keys, dict):
            raise ConfigError(f"{at}: expected a mapping of that command's keys, got {type(keys).__name__}")
        keys = dict(keys)
        command = str(keys.pop("command", name))
        _, config_cls, _ = command_entry(command, at)
        own = _aliased(keys, at)
        valid = set(field_names(config_cls))
        values = {k: v for k, v in defaults.items() if k in valid and k not in own}
        defaults_used.update(values)
        values = check_keys({**values, **own}, config_cls, at)
        stage = Stage(name=name, command=command, config=None)
        values = _resolve(values, stage, stages, [str(n) for n in stages_raw], out, base, at,
                          start=defaults.get("model_name_or_path"))
        try:
            stage.config = config_cls(**values, output_dir=str(out / name))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{at}: {exc}") from None
        stages.append(stage)

    unused = sorted(set(defaults) - defaults_used)
    if unused:
        every = sorted({f for s in stages for f in field_names(type(s.config))})
        raise unknown_key_error(unused[0], every, f"{where}: defaults (no stage has it)")
    return Pipeline(source=where, output_dir=out, stages=stages, raw=raw)


def _start_model(start: str | None, base: Path | None) -> str:
    if start is not None:
        return _beside(start, base)
    from posttrain.models.default_model import default_model_dir

    return str(default_model_dir())


def _resolve(values: dict[str, Any], stage: Stage, earlier: list[Stage], all_names: list[str], out: Path,
             base: Path | None, at: str, start: str | None) -> dict[str, Any]:
    """Stage references → their output dirs; `start` → the starting model; relative local paths →
    beside the YAML."""
    by_name = {s.name: s for s in earlier}

    def reference(key: str, value: str) -> str | None:
        if value == START and not key.startswith(LIST_REFERENCE_KEYS):
            stage.start_keys.append(key)
            return _start_model(start, base)
        if value == stage.name:
            raise ConfigError(f"{at}: {key}: a stage cannot read its own output")
        target = by_name.get(value)
        if target is None:
            if value in all_names:
                raise ConfigError(f"{at}: {key}: stage {value!r} comes later; stages run in the order written")
            return None
        if target.command in NON_MODEL_COMMANDS:
            raise ConfigError(f"{at}: {key}: stage {value!r} is an {target.command} stage and writes no model")
        if key.startswith(("reward_model_path", "reward_funcs")) and target.command != "reward":
            raise ConfigError(f"{at}: {key}: stage {value!r} is a {target.command} stage, not a reward model "
                              "(train one with `command: reward`)")
        stage.references[key] = value
        return str(out / value)

    resolved = dict(values)
    for key, value in values.items():
        if key in REFERENCE_KEYS and isinstance(value, str):
            resolved[key] = reference(key, value) or _beside(value, base)
        elif key in LIST_REFERENCE_KEYS and isinstance(value, list):
            resolved[key] = [reference(f"{key}[{i}]", str(v)) or _reward_func_beside(str(v), base)
                             for i, v in enumerate(value)]
        elif isinstance(value, str) and key in CALLABLE_KEYS:
            resolved[key] = _reward_func_beside(value, base)
        elif isinstance(value, str) and _is_path_key(key):
            resolved[key] = _beside(value, base)
    return resolved


def stage_config_dict(stage: Stage) -> dict[str, Any]:
    return dataclasses.asdict(stage.config)
