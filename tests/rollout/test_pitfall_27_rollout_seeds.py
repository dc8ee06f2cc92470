"""Pitfall 27: every prompt of a step draws from its own seeded stream (seed, step, position), so
processes given the same prompt sample different completions, and how a step is split over
processes does not change a single sample."""

from __future__ import annotations

from posttrain.rollout.generation import HFGenerationBackend, rollout_seeds
from tests.rollout.test_generation import PROMPTS, gen, sharp_llama


def test_pitfall_27_rollout_seeds_are_distinct_per_position_step_and_seed():
    seeds = {s for seed in (0, 1) for step in range(3) for s in rollout_seeds(seed, step, 0, 64)}
    assert len(seeds) == 2 * 3 * 64
    # process 1 of a step of 2 x 4 prompts owns positions 4..7
    assert rollout_seeds(5, 2, 4, 4) == rollout_seeds(5, 2, 0, 8)[4:]


def test_pitfall_27_same_prompt_on_two_processes_samples_differently(tokenizer):
    backend = HFGenerationBackend(sharp_llama(), tokenizer)
    prompt = [PROMPTS[0]]
    rank0 = gen(backend, prompt, num_generations=4, seed=rollout_seeds(3, 0, 0, 1))
    rank1 = gen(backend, prompt, num_generations=4, seed=rollout_seeds(3, 0, 1, 1))
    assert rank0.completion_ids != rank1.completion_ids


def test_pitfall_27_splitting_the_step_over_processes_keeps_every_sample(tokenizer):
    """1 process sampling 3 prompts == 'process 0' sampling the first 2 and 'process 1' the last,
    each with its positions' seeds: the same completions, id for id."""
    backend = HFGenerationBackend(sharp_llama(), tokenizer)
    whole = gen(backend, PROMPTS, num_generations=2, seed=rollout_seeds(3, 1, 0, 3))
    first = gen(backend, PROMPTS[:2], num_generations=2, seed=rollout_seeds(3, 1, 0, 2))
    last = gen(backend, PROMPTS[2:], num_generations=2, seed=rollout_seeds(3, 1, 2, 1))
    assert whole.completion_ids == first.completion_ids + last.completion_ids


def test_pitfall_28_zero3_parameters_gathered_once_per_rollout(tokenizer, monkeypatch):
    """ZeRO-3 partitions (parameters with ds_id): one GatheredParameters around the whole rollout
    of 8 tokens, not one per token (a stand-in deepspeed module records the calls)."""
    import contextlib
    import sys
    import types

    entered = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        entered.append(len(params))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model = sharp_llama()
    for p in model.parameters():
        p.ds_id = 0
    gen(HFGenerationBackend(model, tokenizer), PROMPTS, num_generations=2, max_completion_length=8)
    assert entered == [len(list(model.parameters()))]
