"""Reward functions for the online methods: the protocol, loading by name, scoring with weights.

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float | None]``
(TRL's convention):

- ``prompts[i]`` / ``completions[i]``: strings, or message lists when the dataset is
  conversational (then ``completions[i] == [{"role": "assistant", "content": text}]``);
- ``columns``: the dataset's other fields (e.g. ``answer``), one list entry per completion, plus
  ``completion_ids`` (the sampled token ids). A function without ``**kwargs`` gets only the
  columns it names as parameters.
- it returns one value per completion; ``None`` means "not applicable to this sample" (TRL's
  semantics): it is left out of that sample's weighted sum and of that function's metrics. A
  sample for which EVERY function returned None has no reward at all (``RewardScores.valid``
  False, with a warning): the recipes give it advantage 0 and leave it out of its group's
  baseline (pitfall 31).

The total reward is ``sum_k w_k * r_k`` over the functions that apply (``--reward_weights``,
default 1 each). The metric ``reward`` is that weighted total over the samples that have one;
``rewards/<name>/mean`` are the functions' UNWEIGHTED means over the samples they apply to
(pitfall 18) — docs/rollout.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from posttrain.errors import PosttrainError

RewardFunction = Callable[..., list]

DEFAULT_FORMAT_PATTERN = r"#### -?\d+"
RESERVED_COLUMNS = ("prompts", "completions")
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_FINAL_RE = re.compile(r"####\s*(" + _NUMBER + r")")
MAX_LOCATE_CALLS = 64  # per-sample retries made to find which sample a failing function chokes on


class RewardSpecError(PosttrainError):
    """A --reward_funcs entry cannot be turned into a reward function."""


class RewardFunctionError(PosttrainError):
    """A reward function failed, or returned something that is not one finite number per sample."""


# ---------------------------------------------------------------------------- helpers


def reward_function_name(fn: Any) -> str:
    """``fn.name``, else ``fn.__name__``, else the class name."""
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a message list's last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else str(content)
    return str(completion)


def _short(completion: Any, n: int = 80) -> str:
    text = completion_text(completion)
    return repr(text[:n] + ("…" if len(text) > n else ""))


def _parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def extract_final_answer(text: str) -> str | None:
    """The stated final answer: the number after the last ``#### `` if there is one, else the last
    number in the text (commas and a leading ``$`` allowed: ``$1,234.5``); None when there is none.
    A generalisation of :func:`posttrain.demo.tasks.extract_answer`."""
    finals = _FINAL_RE.findall(text)
    if finals:
        return finals[-1]
    if "####" in text:
        return None  # the required marker is there but no number follows it
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _reference(answer: Any) -> str:
    """The reference answer: the text after the last ``####`` (GSM8K's full solutions), stripped."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip()


def answers_match(completion: str, answer: Any) -> bool:
    """Numeric reference: the completion's final number equals it (to 1e-6 relative). Otherwise:
    the text after the completion's last ``####`` (or the whole completion) equals it exactly,
    after stripping whitespace."""
    ref = _reference(answer)
    ref_num = _parse_number(ref) if _NUMBER_RE.fullmatch(ref) else None
    if ref_num is not None:
        got = extract_final_answer(completion)
        got_num = _parse_number(got) if got is not None else None
        return got_num is not None and abs(got_num - ref_num) <= 1e-6 * max(1.0, abs(ref_num))
    got = completion.rsplit("####", 1)[1] if "####" in completion else completion
    return got.strip() == ref


# ---------------------------------------------------------------------------- built-ins


class AccuracyReward:
    """1.0 when the completion's final answer matches the ``answer`` column (or ``column``), else
    0.0; None (not applicable) where the answer is missing. See :func:`answers_match`."""

    name = "accuracy"

    def __init__(self, column: str | None = None):
        self.column = column or "answer"

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        if self.column not in columns:
            raise KeyError(
                f"the accuracy reward needs an {self.column!r} column in the dataset "
                f"(found: {', '.join(sorted(columns)) or 'none'}); use accuracy=<column> to name another"
            )
        return [
            None if ans is None else float(answers_match(completion_text(c), ans))
            for c, ans in zip(completions, columns[self.column])
        ]


class FormatReward:
    """1.0 when ``re.search(pattern, completion, re.DOTALL)`` matches, else 0.0. Anchor the pattern
    with ``^...$`` to require the whole completion to match. Default ``#### -?\\d+``."""

    name = "format"

    def __init__(self, pattern: str | None = None):
        self.pattern = pattern or DEFAULT_FORMAT_PATTERN
        try:
            self._re = re.compile(self.pattern, re.DOTALL)
        except re.error as e:
            raise RewardSpecError(
                f"format reward: invalid regular expression {self.pattern!r}: {e}"
            ) from None

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self._re.search(completion_text(c)) is not None) for c in completions]


class LengthPenalty:
    """``-scale * number of completion tokens`` (default scale 0.001, so 500 tokens cost 0.5),
    counted on the sampled ids (the ``completion_ids`` column the recipes pass)."""

    name = "length_penalty"

    def __init__(self, scale: float | str | None = None):
        try:
            self.scale = 0.001 if scale is None else float(scale)
        except ValueError:
            raise RewardSpecError(f"length_penalty=<scale>: expected a number, got {scale!r}") from None

    def __call__(self, prompts, completions, completion_ids=None, **columns) -> list[float]:
        if completion_ids is None:
            raise KeyError(
                "the length_penalty reward needs the completion_ids column (the sampled token ids)"
            )
        return [-self.scale * len(ids) for ids in completion_ids]


BUILTINS: dict[str, Callable[[str | None], RewardFunction]] = {
    "accuracy": AccuracyReward,
    "format": FormatReward,
    "length_penalty": LengthPenalty,
}


# ---------------------------------------------------------------------------- loading


def _import_module(module: str, spec: str):
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise RewardSpecError(f"reward function {spec!r}: no such file {str(path)!r}")
        name = f"posttrain_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = mod
        try:
            file_spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise RewardSpecError(
                f"reward function {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}"
            ) from e
        return mod
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # console scripts do not put the cwd on sys.path
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise RewardSpecError(
                f"reward function {spec!r}: no module named {module!r} (looked in the current directory "
                f"{cwd} and on sys.path)"
            ) from None
        raise RewardSpecError(f"reward function {spec!r}: importing {module!r} failed: {e}") from e
    except Exception as e:
        raise RewardSpecError(
            f"reward function {spec!r}: importing {module!r} failed: {type(e).__name__}: {e}"
        ) from e


def _load_callable(spec: str) -> RewardFunction:
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise RewardSpecError(f"reward function {spec!r}: expected module:function")
    obj = _import_module(module, spec)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardSpecError(f"reward function {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type) or not callable(obj):
        kind = "a class" if isinstance(obj, type) else f"not callable ({type(obj).__name__})"
        raise RewardSpecError(
            f"reward function {spec!r}: {attr!r} is {kind}; point at a function "
            "fn(prompts, completions, **columns) or a callable instance"
        )
    return obj


def _reward_model(path: str, model_kwargs: dict | None = None) -> RewardFunction:
    from posttrain.models.reward_model import RewardModelReward  # heavy: only when asked for

    return RewardModelReward(path, **(model_kwargs or {}))


def reward_model_kwargs(config) -> dict:
    """The policy's dtype, attn_implementation, trust_remote_code and autocast, for a reward model
    a run loads (engine/precision.py)."""
    from posttrain.engine.precision import resolve_precision
    from posttrain.models.loading import model_load_kwargs

    return {**model_load_kwargs(config), "autocast": resolve_precision(config).autocast}


def load_reward_functions(specs: list[str], *, reward_model_path: str | None = None,
                          model_kwargs: dict | None = None) -> list[RewardFunction]:
    """``--reward_funcs`` entries -> callables, in order.

    An entry is a built-in (``accuracy`` | ``accuracy=<column>``, ``format`` | ``format=<regex>``,
    ``length_penalty`` | ``length_penalty=<scale>``), ``module:function`` (imported from the
    current directory or sys.path; ``path/to/file.py:function`` also works), or a reward model
    directory (scored by :class:`posttrain.models.reward_model.RewardModelReward`).
    ``reward_model_path`` appends a reward model. Raises RewardSpecError naming the entry.
    """
    fns: list[RewardFunction] = []
    for spec in specs:
        spec = str(spec).strip()
        name, eq, arg = spec.partition("=")
        if name in BUILTINS:
            fns.append(BUILTINS[name](arg if eq else None))
        elif Path(spec).is_dir():
            fns.append(_reward_model(spec, model_kwargs))
        elif ":" in spec:
            fns.append(_load_callable(spec))
        else:
            raise RewardSpecError(
                f"reward function {spec!r}: not a built-in ({', '.join(BUILTINS)}), a module:function, "
                "or a reward model directory"
            )
    if reward_model_path is not None:
        fns.append(_reward_model(reward_model_path, model_kwargs))
    return fns



def reward_functions_for(config, passed: list | None) -> list[RewardFunction]:
    """A run's reward functions, in weight order: those passed from Python, then
    ``config.reward_funcs``, then ``config.reward_model_path``; one ``config.reward_weights`` each."""
    from posttrain.config import ConfigError

    fns = list(passed or []) + load_reward_functions(config.reward_funcs, reward_model_path=config.reward_model_path,
                                                     model_kwargs=reward_model_kwargs(config))
    if not fns:
        raise ConfigError("no reward function: pass --reward_funcs module:function (or a built-in: accuracy, "
                          "format, length_penalty) and/or --reward_model_path RM_DIR (a `posttrain reward` output)")
    if config.reward_weights is not None and len(config.reward_weights) != len(fns):
        raise ConfigError(f"--reward_weights has {len(config.reward_weights)} values for {len(fns)} reward functions")
    return fns

# ---------------------------------------------------------------------------- scoring


@dataclass
class RewardScores:
    """``total`` (N,) = sum_k w_k * r_k over the functions that apply to each sample (0 where none
    does); ``per_fn[name]`` (N,) unweighted values (0 where not applicable); ``applicable[name]``
    (N,) bool; ``valid`` (N,) bool: at least one function applies (else the sample has no reward:
    advantage 0, out of the baseline). Unpacks as ``total, per_fn = score_completions(...)``."""

    total: Tensor
    per_fn: dict[str, Tensor]
    applicable: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    valid: Tensor | None = None  # None: every sample has a reward

    def __iter__(self) -> Iterator:
        return iter((self.total, self.per_fn))

    def metrics(self) -> dict[str, float]:
        """``reward`` / ``reward_std``: the weighted total, as the advantages see it;
        ``rewards/<name>/mean`` / ``std``: each function unweighted, over the samples it applies to
        (NaN when it applied to none). Samples without any reward are left out of ``reward``."""
        total = self.total if self.valid is None else self.total[self.valid]
        out = {
            "reward": total.mean().item() if total.numel() else math.nan,
            "reward_std": total.std().item() if total.numel() > 1 else 0.0,
        }
        for name, values in self.per_fn.items():
            v = values[self.applicable[name]] if name in self.applicable else values
            out[f"rewards/{name}/mean"] = v.mean().item() if v.numel() else math.nan
            out[f"rewards/{name}/std"] = v.std().item() if v.numel() > 1 else 0.0
        return out


def _unique_names(fns) -> list[str]:
    names, seen = [], {}
    for fn in fns:
        base = reward_function_name(fn)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _kwargs_for(fn, columns: dict[str, list]) -> dict[str, list]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return columns
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in named}


def _as_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, (bool, int, float)) or hasattr(value, "__float__") and not isinstance(value, str):
        return float(value)
    raise TypeError(f"a {type(value).__name__}")


def _locate_failure(fn, name, prompts, completions, kwargs, error: Exception) -> RewardFunctionError:
    """Call ``fn`` one sample at a time to find the sample it fails on."""
    for i in range(min(len(completions), MAX_LOCATE_CALLS)):
        try:
            fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in kwargs.items()})
        except Exception as e:
            return RewardFunctionError(
                f"reward function {name!r} raised {type(e).__name__}: {e} on sample {i} "
                f"(completion {_short(completions[i])})"
            )
    return RewardFunctionError(
        f"reward function {name!r} raised {type(error).__name__}: {error} (on the batch of "
        f"{len(completions)}; no single sample reproduces it)"
    )


def score_completions(
    fns: list[RewardFunction],
    weights: list[float] | None,
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
) -> RewardScores:
    """Run every reward function on the N completions and combine them.

    weights: one per function (``--reward_weights``), default 1. columns: name -> list of N.
    Returns :class:`RewardScores` (``total, per_fn = ...`` unpacks it). Raises
    RewardFunctionError naming the function, the sample and its completion when a function raises,
    returns a non-finite or non-numeric value, or returns the wrong number of values.
    """
    n = len(completions)
    columns = dict(columns or {})
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions")
    for key, values in columns.items():
        if key in RESERVED_COLUMNS:
            raise ValueError(
                f"a dataset column may not be named {key!r} (reward functions receive it "
                "as an argument); rename the column"
            )
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    if not fns:
        raise ValueError("no reward functions")
    weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"reward weights must be finite numbers, got {weights}")

    names = _unique_names(fns)
    total = torch.zeros(n, dtype=torch.float32)
    per_fn, applicable = {}, {}
    for fn, name, w in zip(fns, names, weights):
        kwargs = _kwargs_for(fn, columns)
        try:
            out = fn(prompts, completions, **kwargs)
        except Exception as e:
            raise _locate_failure(fn, name, prompts, completions, kwargs, e) from e
        if isinstance(out, Tensor):
            out = out.reshape(-1).tolist() if out.dim() <= 1 else out
        try:
            out = list(out)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {name!r} returned a {type(out).__name__}, expected a list of {n} numbers"
            ) from None
        if len(out) != n:
            raise RewardFunctionError(
                f"reward function {name!r} returned {len(out)} values for {n} completions (one per completion)"
            )
        values = torch.zeros(n, dtype=torch.float32)
        mask = torch.zeros(n, dtype=torch.bool)
        for i, v in enumerate(out):
            try:
                f = _as_float(v)
            except TypeError as e:
                raise RewardFunctionError(
                    f"reward function {name!r} returned {e} for sample {i} (completion "
                    f"{_short(completions[i])}); expected a number or None"
                ) from None
            if f is None:
                continue
            if not math.isfinite(f):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {f} for sample {i} (completion {_short(completions[i])})"
                )
            values[i], mask[i] = f, True
        per_fn[name], applicable[name] = values, mask
        total += w * values  # 0 where not applicable: left out of the sum
    valid = torch.stack(list(applicable.values())).any(dim=0)
    if not valid.all():
        first = int((~valid).nonzero()[0])
        warnings.warn(f"{int((~valid).sum())} of {n} completions got None from every reward function (e.g. sample "
                      f"{first}, completion {_short(completions[first])}): no reward, so advantage 0 and left out "
                      "of their group's baseline", stacklevel=2)
    return RewardScores(total=total, per_fn=per_fn, applicable=applicable, weights=dict(zip(names, weights)),
                        valid=valid)


def reward_inputs(examples: list, rollout, tokenizer) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, columns), one entry per completion of ``rollout`` (whose
    ``prompt_index`` points into ``examples``, a list of PromptExample). Conversational prompts
    get message-list completions; columns carry each example's fields and ``completion_ids``."""
    texts = rollout.texts(tokenizer)
    prompts, completions = [], []
    keys = list(dict.fromkeys(k for ex in examples for k in ex.columns))
    columns: dict[str, list] = {k: [] for k in keys}
    for idx, text in zip(rollout.prompt_index, texts):
        ex = examples[idx]
        prompts.append(ex.prompt)
        completions.append([{"role": "assistant", "content": text}] if isinstance(ex.prompt, list) else text)
        for k in keys:
            columns[k].append(ex.columns.get(k))
    columns["completion_ids"] = [list(c) for c in rollout.completion_ids]
    return prompts, completions, columns
