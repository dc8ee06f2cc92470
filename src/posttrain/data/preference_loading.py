"""From a preference config to tokenised train and held-out examples (reward, DPO, KTO share it)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from posttrain.data.formats import describe_format, detect_format
from posttrain.data.in_memory import as_loaded_rows
from posttrain.data.preference import prepare_preference_examples, prepare_unpaired_examples


def load_preference_data(config, tokenizer, dataset: Any = None, eval_dataset: Any = None, *,
                         unpaired: bool = False, log: Callable[[str], None] = print) -> tuple[list, list]:
    """(train, held_out) examples: `PreferenceExample`s, or `UnpairedExample`s when `unpaired`.

    The held-out set is `eval_dataset` / `--eval_dataset_name`, else a seeded `--eval_split_ratio`
    share of the examples (seeded; held-out examples never train)."""
    prepare = prepare_unpaired_examples if unpaired else prepare_preference_examples
    loaded = as_loaded_rows(dataset, config.dataset_name, config.dataset_split, config.dataset_config)
    fmt = detect_format(loaded.rows, loaded.source)
    log(f"data: {loaded.source}: {len(loaded.rows)} rows, format {describe_format(fmt)}")
    kwargs = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
              "truncation_mode": config.truncation_mode}
    train, report = prepare(loaded, fmt, tokenizer, **kwargs)
    for line in report.lines():
        log(line)
    held_out: list = []
    if eval_dataset is not None or config.eval_dataset_name:
        eval_loaded = as_loaded_rows(eval_dataset, config.eval_dataset_name, config.dataset_split)
        held_out, eval_report = prepare(eval_loaded, detect_format(eval_loaded.rows, eval_loaded.source),
                                        tokenizer, **kwargs)
        log(f"held-out: {eval_loaded.source}: {len(held_out)} examples")
    elif config.eval_split_ratio > 0:
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        n_eval = max(1, int(round(len(train) * config.eval_split_ratio)))
        held_out = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        log(f"held-out: {len(held_out)} of the rows (--eval_split_ratio {config.eval_split_ratio}), never trained on")
    if not train:
        raise ValueError(f"{loaded.source}: no training example left")
    return train, held_out
