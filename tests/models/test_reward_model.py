"""Reward models: loading from a causal LM, the last-real-token read (pitfall 9), the reward function."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.data.formats import detect_format
from posttrain.data.in_memory import as_loaded_rows
from posttrain.data.preference import prepare_preference_examples
from posttrain.demo.tasks import generate_preferences
from posttrain.models.reward_model import (
    RewardModelReward,
    RewardScorer,
    last_token_index,
    load_reward_model,
    reward_model_from_causal_lm,
)
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, EXACT64_REL


@pytest.fixture(scope="module")
def pair_rows():
    train, _ = generate_preferences(seed=11, n_train=8, n_eval=0)
    return train


@pytest.fixture()
def sequences(pair_rows, tokenizer):
    """8 token sequences (prompt + completion through <|im_end|>) of different lengths."""
    loaded = as_loaded_rows(pair_rows, None)
    examples, _ = prepare_preference_examples(loaded, detect_format(loaded.rows, loaded.source), tokenizer,
                                              max_length=None, max_prompt_length=None)
    seqs = [e.prompt_ids + e.chosen_ids for e in examples[:4]] + [e.prompt_ids + e.rejected_ids for e in examples[:4]]
    assert len({len(s) for s in seqs}) > 3, "lengths must differ for padding to matter"
    assert all(s[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id for s in seqs)  # the SmolLM2 trap
    return seqs


def _tiny_rm(tokenizer, seed=0):
    return reward_model_from_causal_lm(make_tiny_llama(seed=seed), pad_token_id=tokenizer.pad_token_id).eval()


def _padded(seqs, pad_id, side):
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def test_last_token_index_from_mask_and_lengths():
    """Right padding [1,1,0] -> 1; left [0,1,1] -> 2; row 1 of a T=3 batch is offset by 3.
    Padding-free lengths 2, 3 -> flat indices 1 and 4."""
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3 + 2]
    assert last_token_index(seq_lens=[2, 3]).tolist() == [1, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


def test_pitfall_09_reward_read_at_last_real_token(tokenizer, sequences):
    """Scores are the same one at a time, in a batch of 8 with right or left padding, and
    padding-free; reading at a pad position (or by HF's pad-id rule, pad == eos here) differs."""
    model = _tiny_rm(tokenizer).double()  # an identity: float64 (tolerances: tests/numerics.py)
    scorer = RewardScorer(model)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        single = torch.cat([scorer(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long))
                            for s in sequences])
        right = scorer(*_padded(sequences, pad, "right"))
        left = scorer(*_padded(sequences, pad, "left"))
        flat = torch.tensor([[t for s in sequences for t in s]])
        free = scorer(flat, seq_lens=[len(s) for s in sequences])
    assert single.dtype == torch.float64 and single.shape == (8,)
    for batched in (right, left, free):
        torch.testing.assert_close(batched, single, atol=EXACT64_ABS, rtol=EXACT64_REL)

    # The test can fail: the score at the first pad after a short sequence is another number
    # (close, since that pad is the same <|im_end|> id, but far outside the tolerance above) ...
    ids, mask = _padded(sequences, pad, "right")
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        at_pad = torch.stack([model.score(hidden[i, len(s)]).squeeze() for i, s in enumerate(sequences)
                              if len(s) < ids.shape[1]])
        short = torch.tensor([i for i, s in enumerate(sequences) if len(s) < ids.shape[1]])
        # ... and so is HF's own rule (rightmost token != pad id): with pad == eos it reads the
        # token BEFORE the final <|im_end|>
        hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert (at_pad - single[short]).abs().min() > 1e-5
    assert (hf - single).abs().min() > 1e-2


def test_scores_under_bf16_autocast_are_fp32(tokenizer, sequences):
    scorer = RewardScorer(_tiny_rm(tokenizer))
    ids, mask = _padded(sequences, tokenizer.pad_token_id, "right")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer(ids, attention_mask=mask)
    assert scores.dtype == torch.float32


def test_load_reward_model_from_a_causal_lm_dir(tmp_path, tokenizer):
    """Backbone weights from the checkpoint, a fresh head ~ N(0, 1/(d+1)), pad id from the tokenizer."""
    causal = make_tiny_llama(hidden_size=64)
    causal.save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    rm = load_reward_model(str(tmp_path / "lm"), pad_token_id=tokenizer.pad_token_id)
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    assert rm.config.pad_token_id == tokenizer.pad_token_id
    for k, v in causal.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[k], v), k
    std = rm.score.weight.std().item()
    assert std == pytest.approx(1 / math.sqrt(64 + 1), rel=0.3)
    # a saved reward model keeps its score head
    rm.save_pretrained(tmp_path / "rm")
    again = load_reward_model(str(tmp_path / "rm"))
    assert torch.equal(again.score.weight, rm.score.weight)


def test_load_reward_model_refuses_pickle_weights(tmp_path):
    make_tiny_llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="safetensors"):
        load_reward_model(str(tmp_path))


def test_reward_model_reward_tokenises_like_training(tokenizer, pair_rows, sequences):
    """RewardModelReward on (prompt, completion) scores exactly the training sequences: the same
    ids (prompt and completion tokenised separately, through <|im_end|>) and the same read."""
    model = _tiny_rm(tokenizer)
    rm = RewardModelReward(None, model=model, tokenizer=tokenizer, device="cpu", batch_size=3)
    assert rm.name == "reward_model" and rm.__name__ == "reward_model"
    prompts = [r["prompt"] for r in pair_rows[:4]] * 2
    completions = [r["chosen"] for r in pair_rows[:4]] + [r["rejected"] for r in pair_rows[:4]]
    assert [rm.tokenize(p, c) for p, c in zip(prompts, completions)] == sequences
    got = rm(prompts, completions, answer=[0] * 8)  # extra columns are accepted
    with torch.no_grad():
        want = RewardScorer(model)(*_padded(sequences, tokenizer.pad_token_id, "right"))
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    # plain strings: prompt as text, completion + EOS
    text = rm(["What is 2 + 2?"], [" #### 4"])
    assert len(text) == 1 and math.isfinite(text[0])
