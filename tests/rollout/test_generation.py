"""The HF generation backend: ids as sampled, log-probs equal to the trainer's (pitfalls 13, 15-17)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from posttrain.models.logprobs import LogProbModel
from posttrain.rollout.generation import (
    GenerationBackend,
    GenerationBackendError,
    HFGenerationBackend,
    Rollout,
    make_backend,
    resolve_stop_token_ids,
)
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, EXACT64_REL

# The sampler (KV-cached decode) and the trainer (one full forward) compute the same log-probs in
# real arithmetic: compared in float64 (tolerances: tests/numerics.py).
RTOL, ATOL = EXACT64_REL, EXACT64_ABS


def sharp_llama(seed: int = 0):
    """The tiny random Llama with its (tied) embeddings scaled up, so next-token distributions are
    peaked rather than near-uniform and log-prob mismatches are visible. float64 (see ATOL)."""
    model = make_tiny_llama(seed=seed).double()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model


def gen(backend, prompts, **kw):
    args = dict(
        num_generations=1,
        max_completion_length=8,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        stop_token_ids=[],
        seed=0,
    )
    args.update(kw)
    return backend.generate(prompts, **args)


def trainer_logps(model, prompt, completion, temperature=1.0):
    """What the loss sees: LogProbModel on the unpadded prompt_ids + completion_ids."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        out = LogProbModel(model)(ids, temperature=temperature)["logps"][0]
    return out[len(prompt) - 1 :]


def assert_logps_match(model, rollout: Rollout, temperature=1.0):
    for p, c, lp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampler_logps):
        assert len(c) == len(lp) >= 1
        expected = trainer_logps(model, p, c, temperature)
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), expected, atol=ATOL, rtol=RTOL)


PROMPTS = [[1, 504, 3101, 314, 253], [1, 77], [1, 900, 901, 902, 903, 904, 905, 906, 907]]


def test_backend_satisfies_protocol(tokenizer):
    assert isinstance(HFGenerationBackend(sharp_llama(), tokenizer), GenerationBackend)


def test_sampler_logps_equal_trainer_logps(tokenizer):
    model = sharp_llama()
    rollout = gen(HFGenerationBackend(model, tokenizer), [PROMPTS[0]], num_generations=3)
    # peaked distributions: the check below is not comparing near-uniform numbers
    assert (
        min(min(lp) for lp in rollout.sampler_logps) < -1
        and max(max(lp) for lp in rollout.sampler_logps) > -3
    )
    assert_logps_match(model, rollout)


def test_left_padding_does_not_change_logps(tokenizer):
    """Prompts of lengths 5, 2 and 9 in one left-padded batch: each completion's log-probs equal
    those of the unpadded sequence scored alone."""
    model = sharp_llama()
    rollout = gen(HFGenerationBackend(model, tokenizer), PROMPTS, num_generations=2)
    assert [len(p) for p in rollout.prompt_ids] == [5, 5, 2, 2, 9, 9]
    assert_logps_match(model, rollout)


def test_temperature_logps_are_the_tempered_distribution(tokenizer):
    model = sharp_llama()
    rollout = gen(HFGenerationBackend(model, tokenizer), PROMPTS[:2], temperature=0.7, num_generations=2)
    assert_logps_match(model, rollout, temperature=0.7)


def test_top_k_top_p_logps_are_the_truncated_distribution(tokenizer):
    """With top-k/top-p the sampler log-prob is under the renormalised kept set."""
    model = sharp_llama()
    k, temp = 5, 0.8
    rollout = gen(
        HFGenerationBackend(model, tokenizer), [PROMPTS[0]], temperature=temp, top_k=k, num_generations=2
    )
    for p, c, lp in zip(rollout.prompt_ids, rollout.completion_ids, rollout.sampler_logps):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / temp
        top = logits.topk(k, dim=-1)
        kept = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values)
        expected = torch.log_softmax(kept, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), expected, atol=ATOL, rtol=RTOL)
        assert all(tok in row for tok, row in zip(c, top.indices.tolist()))


def test_greedy_is_argmax_with_untempered_logps(tokenizer):
    model = sharp_llama()
    backend = HFGenerationBackend(model, tokenizer)
    a = gen(backend, PROMPTS, temperature=0.0, num_generations=2, seed=None)
    b = gen(backend, PROMPTS, temperature=0.0, seed=None)
    assert a.completion_ids[::2] == a.completion_ids[1::2] == b.completion_ids
    assert_logps_match(model, a)
    for p, c in zip(b.prompt_ids, b.completion_ids):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
        assert logits.argmax(-1).tolist() == c


def test_two_eos_ids_in_generation_config_both_stop(tokenizer):
    model = sharp_llama(seed=3)
    backend = HFGenerationBackend(model, tokenizer)
    free = gen(backend, PROMPTS[:2], max_completion_length=10, seed=5)
    u0, u1 = free.completion_ids
    a = next(t for t in u0[1:] if t not in u1)
    b = next(t for t in u1[2:] if t not in u0)
    model.generation_config.eos_token_id = [a, b]  # a LIST of eos ids, as many models ship
    assert set(resolve_stop_token_ids(model, tokenizer)) >= {a, b}
    stopped = gen(backend, PROMPTS[:2], max_completion_length=10, seed=5)
    assert stopped.completion_ids == [u0[: u0.index(a) + 1], u1[: u1.index(b) + 1]]
    assert stopped.truncated == [False, False]
    # a stopped row leaves the batch, so the other row's forward runs at another batch size:
    # the same ids, log-probs equal up to rounding
    for got, want, n in zip(stopped.sampler_logps, free.sampler_logps, (u0.index(a) + 1, u1.index(b) + 1)):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want[:n], dtype=torch.float64),
                                   atol=ATOL, rtol=RTOL)


def test_stop_token_argument_and_texts(tokenizer):
    model = sharp_llama(seed=3)
    backend = HFGenerationBackend(model, tokenizer)
    free = gen(backend, [PROMPTS[0]], max_completion_length=10, seed=5)
    stop = free.completion_ids[0][3]
    cut = free.completion_ids[0].index(stop) + 1
    r = gen(backend, [PROMPTS[0]], max_completion_length=10, seed=5, stop_token_ids=[stop])
    assert r.completion_ids == [free.completion_ids[0][:cut]] and r.truncated == [False]
    # texts leave the final stop token out (it may be an ordinary token) and never feed the loss
    assert r.texts(tokenizer) == [tokenizer.decode(r.completion_ids[0][:-1], skip_special_tokens=True)]
    # a string --stop_token given to the backend
    eos_text = tokenizer.convert_ids_to_tokens(stop)
    b2 = HFGenerationBackend(model, tokenizer, stop_tokens=[eos_text])
    assert stop in b2.stop_token_ids()
    with pytest.raises(ValueError, match="not a single token"):
        HFGenerationBackend(model, tokenizer, stop_tokens=["hello there my friend"])


def test_completion_at_max_length_is_truncated(tokenizer):
    model = sharp_llama()
    r = gen(HFGenerationBackend(model, tokenizer), PROMPTS, max_completion_length=4, num_generations=2)
    stops = set(r.stop_token_ids)
    for c, t in zip(r.completion_ids, r.truncated):
        assert t == (not (set(c) & stops))
        if t:
            assert len(c) == 4
    assert any(r.truncated)
    assert r.texts(tokenizer)[0] == tokenizer.decode(r.completion_ids[0], skip_special_tokens=True)


def test_seed_determinism_and_global_rng_untouched(tokenizer):
    backend = HFGenerationBackend(sharp_llama(), tokenizer)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = gen(backend, PROMPTS, num_generations=2, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is not consumed
    b = gen(backend, PROMPTS, num_generations=2, seed=7)
    c = gen(backend, PROMPTS, num_generations=2, seed=8)
    assert a == b
    assert a.completion_ids != c.completion_ids


def test_a_row_sample_does_not_depend_on_other_rows_stopping(tokenizer):
    """Finished completions leave the decode batch; the noise of each draw is per original row, so
    the same seed gives a row the same tokens whether or not the others stopped early."""
    model = sharp_llama(seed=3)
    backend = HFGenerationBackend(model, tokenizer)
    long = gen(backend, PROMPTS, num_generations=2, max_completion_length=12, seed=11)
    short_first = gen(backend, PROMPTS, num_generations=2, max_completion_length=12, seed=11,
                      stop_token_ids=[long.completion_ids[0][0]])  # row 0 stops at once
    assert short_first.completion_ids[0] == long.completion_ids[0][:1]
    for got, want in zip(short_first.completion_ids[1:], long.completion_ids[1:]):
        cut = next((i + 1 for i, t in enumerate(want) if t == long.completion_ids[0][0]), len(want))
        assert got == want[:cut]


def test_one_prefill_per_prompt_and_finished_rows_leave_the_batch(tokenizer):
    """The prompt is run once for its whole group (the cache is repeated), and the decode batch
    shrinks as completions stop."""
    model = sharp_llama(seed=3)
    batch_sizes = []
    hook = model.model.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    r = gen(HFGenerationBackend(model, tokenizer), PROMPTS, num_generations=4, max_completion_length=12, seed=2,
            stop_token_ids=[253, 314, 900])
    hook.remove()
    assert batch_sizes[0] == (3, 9)  # one prefill: 3 prompts (not 12 rows), left-padded to 9
    decode = [b for b, t in batch_sizes[1:]]
    assert all(t == 1 for _, t in batch_sizes[1:]) and decode[-1] < 12  # some rows did stop
    assert decode == sorted(decode, reverse=True)
    finished_by = [sum(1 for c, tr in zip(r.completion_ids, r.truncated) if not tr and len(c) <= s)
                   for s in range(1, len(decode) + 1)]
    assert decode == [12 - n for n in finished_by]
    assert_logps_match(model, r)


def test_groups_are_consecutive(tokenizer):
    r = gen(HFGenerationBackend(sharp_llama(), tokenizer), PROMPTS, num_generations=3)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert r.num_generations == 3 and len(r) == 9
    # sampled, so a group's completions differ
    assert len({tuple(c) for c in r.completion_ids[:3]}) > 1


def test_batch_size_splits_calls_but_keeps_indices(tokenizer):
    model = sharp_llama()
    r = gen(HFGenerationBackend(model, tokenizer, batch_size=2), PROMPTS, num_generations=2)
    assert r.prompt_index == [0, 0, 1, 1, 2, 2]
    assert_logps_match(model, r)


def test_pitfall_15_after_optimizer_step_rollouts_use_new_weights(tokenizer):
    """Pitfall 15 for the HF backend: after a step, the generator's log-probs equal the trainer's
    with the new weights (and differ from the old weights')."""
    model = sharp_llama()
    policy = LogProbModel(model)
    backend = HFGenerationBackend(policy, tokenizer)  # unwraps to the same module
    before = gen(backend, PROMPTS, num_generations=2, seed=1)
    old = copy.deepcopy(model)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([before.prompt_ids[0] + before.completion_ids[0]])
    (-policy(ids)["logps"].sum()).backward()
    opt.step()
    backend.sync_weights(policy)

    after = gen(backend, PROMPTS, num_generations=2, seed=1)
    assert_logps_match(model, after)
    drift = max(
        (torch.tensor(lp) - trainer_logps(old, p, c)).abs().max().item()
        for p, c, lp in zip(after.prompt_ids, after.completion_ids, after.sampler_logps)
    )
    assert drift > 1e-2


def test_train_mode_restored_and_eval_during_generation(tokenizer):
    model = sharp_llama()
    model.train()
    model.model.layers[0].eval()  # a mixed tree is restored module by module
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    gen(HFGenerationBackend(model, tokenizer), [PROMPTS[0]], max_completion_length=3)
    hook.remove()
    assert seen and not any(seen)
    assert model.training and model.model.training and not model.model.layers[0].training


def test_peft_model_generates_with_the_adapter(tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        sharp_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    rollout = gen(HFGenerationBackend(model, tokenizer), PROMPTS[:2], num_generations=2)
    assert_logps_match(model, rollout)


def test_make_backend(tokenizer, monkeypatch):
    model = sharp_llama()
    assert isinstance(make_backend("hf", model, tokenizer), HFGenerationBackend)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(GenerationBackendError, match=r"posttrain\[vllm\]"):
        make_backend("vllm", model, tokenizer)
    with pytest.raises(GenerationBackendError, match="unknown generation backend 'sglang'"):
        make_backend("sglang", model, tokenizer)


def test_bad_arguments(tokenizer):
    backend = HFGenerationBackend(sharp_llama(), tokenizer)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        gen(backend, [[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        gen(backend, [[1, 2]], top_p=0.0)
    with pytest.raises(ValueError, match="max_completion_length"):
        gen(backend, [[1, 2]], max_completion_length=0)


def test_model_generation_config_sampling_defaults_are_ignored(tokenizer):
    """Only the call's arguments shape the distribution: a generation_config asking for
    temperature 0.2, top-p/top-k/min-p truncation and a repetition penalty changes nothing."""
    model = sharp_llama()
    model.generation_config.update(
        do_sample=True, temperature=0.2, top_p=0.9, top_k=3, min_p=0.3, repetition_penalty=1.3
    )
    rollout = gen(HFGenerationBackend(model, tokenizer), PROMPTS, num_generations=2)
    assert_logps_match(model, rollout)
