"""LogProbModel(prefix=SharedPrefix(...)): each prompt run once for all its rows, with the numbers
(log-probs, entropy and gradients) of scoring every prompt + continuation row on its own. Identities,
so in float64 (tolerances: tests/numerics.py)."""

from __future__ import annotations

import torch

from posttrain.models.logprobs import LogProbModel, SharedPrefix
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, EXACT64_REL, U32

PROMPTS = [[1, 504, 3101, 314, 253], [1, 77, 88]]
ROWS = [(0, [11, 12, 13, 2]), (0, [14, 2]), (1, [15, 16, 17, 18, 19]), (1, [20]), (0, [21, 22, 23])]


def shared_batch():
    width = max(len(p) for p in PROMPTS)
    p_ids = torch.full((len(PROMPTS), width), 2)
    p_mask = torch.zeros_like(p_ids)
    for i, p in enumerate(PROMPTS):  # left padding
        p_ids[i, width - len(p):] = torch.tensor(p)
        p_mask[i, width - len(p):] = 1
    t = max(len(c) for _, c in ROWS)
    ids = torch.full((len(ROWS), t), 2)
    mask = torch.zeros_like(ids)
    for i, (_, c) in enumerate(ROWS):  # right padding
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    return ids, mask, SharedPrefix(p_ids, p_mask, torch.tensor([k for k, _ in ROWS]))


def per_row_reference(policy):
    """Each prompt + continuation scored alone (no padding at all); the continuation's entries."""
    logps, entropy = [], []
    for k, c in ROWS:
        out = policy(torch.tensor([PROMPTS[k] + c]), with_entropy=True)
        logps.append(out["logps"][0, len(PROMPTS[k]) - 1:])
        entropy.append(out["entropy"][0, len(PROMPTS[k]) - 1:])
    return logps, entropy


def test_shared_prefix_equals_scoring_each_row_alone():
    model = make_tiny_llama(seed=4).double()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)  # peaked distributions: mismatches would show
    policy = LogProbModel(model)
    ids, mask, prefix = shared_batch()
    out = policy(ids, attention_mask=mask, prefix=prefix, with_entropy=True)
    assert out["logps"].shape == ids.shape
    ref_logps, ref_entropy = per_row_reference(policy)
    for i, (_, c) in enumerate(ROWS):
        torch.testing.assert_close(out["logps"][i, :len(c)], ref_logps[i], rtol=EXACT64_REL, atol=EXACT64_ABS)
        torch.testing.assert_close(out["entropy"][i, :len(c)], ref_entropy[i], rtol=EXACT64_REL, atol=EXACT64_ABS)
        assert (out["logps"][i, len(c):] == 0).all()  # padding is not scored


def test_shared_prefix_gradients_equal_per_row_gradients():
    ids, mask, prefix = shared_batch()
    weights = torch.linspace(0.5, 1.5, ids.numel()).view(ids.shape) * mask
    grads = []
    for shared in (True, False):
        model = make_tiny_llama(seed=4).double()
        policy = LogProbModel(model)
        if shared:
            loss = (policy(ids, attention_mask=mask, prefix=prefix)["logps"] * weights).sum()
        else:
            loss = sum((lp * weights[i, :len(lp)]).sum() for i, lp in enumerate(per_row_reference(policy)[0]))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # Not a float64-exact comparison: transformers' LlamaRMSNorm computes in fp32 whatever the dtype,
    # so every gradient passes 5 fp32 roundings (2 layers x 2 norms + the final norm), and a shared
    # prompt's gradient is the sum over its <= 3 rows, taken after those roundings here and before
    # them per row: <= 5 x 3 x 2 = 30 roundings of U32 relative to the tensor's largest entry.
    for name, g in grads[0].items():
        bound = 32 * U32 * grads[1][name].abs().max().item()
        torch.testing.assert_close(g, grads[1][name], rtol=0, atol=bound + EXACT64_ABS, msg=name)
    assert grads[0]["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # the prompt pass got gradient


def test_shared_prefix_under_gradient_checkpointing_scores_the_same():
    """Checkpointed layers cannot keep a KV cache: the rows are scored as prompt + continuation."""
    ids, mask, prefix = shared_batch()
    model = make_tiny_llama(seed=4).double()
    policy = LogProbModel(model)
    with torch.no_grad():
        plain = policy(ids, attention_mask=mask, prefix=prefix)["logps"]
    model.gradient_checkpointing_enable()
    model.train()
    checkpointed = policy(ids, attention_mask=mask, prefix=prefix)["logps"]
    torch.testing.assert_close(checkpointed.detach(), plain, rtol=EXACT64_REL, atol=EXACT64_ABS)
