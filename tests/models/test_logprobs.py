"""Chunked per-token log-probs: values, gradients, entropy, accuracy, and LogProbModel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posttrain.models.logprobs import LogProbModel, check_packing_support, token_logprobs_from_hidden
from tests.conftest import make_tiny_llama
from tests.numerics import EXACT64_ABS, EXACT64_REL

N, H, V = 10, 8, 37


def _naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden.double() @ weight.double().T) / temperature
    logps = torch.log_softmax(logits, dim=-1)
    logp = logps.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logp, entropy, logits.argmax(-1) == targets


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype) * 2
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 3, N, 4 * N])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_naive_fp64(chunk_size, temperature):
    """Chunked kernel == naive log-softmax, values and gradients: an identity, so in float64
    (tolerances: tests/numerics.py). The fp32 path is the same code with another dtype."""
    hidden, weight, targets = _data(torch.float64)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    upstream = torch.randn(N, dtype=torch.float64)

    logp, ent, cor = token_logprobs_from_hidden(
        h1, w1, targets, chunk_size=chunk_size, temperature=temperature, with_entropy=True, with_accuracy=True
    )
    assert logp.dtype == torch.float64 and logp.shape == (N,)
    (logp * upstream).sum().backward()

    ref = torch.log_softmax((h2 @ w2.T) / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    for got, want in ((logp, ref), (h1.grad, h2.grad), (w1.grad, w2.grad)):
        torch.testing.assert_close(got, want, rtol=EXACT64_REL, atol=EXACT64_ABS)

    _, ent_ref, cor_ref = _naive(hidden, weight, targets, temperature)
    assert (ent >= 0).all() and not ent.requires_grad
    torch.testing.assert_close(ent, ent_ref, rtol=EXACT64_REL, atol=EXACT64_ABS)
    assert torch.equal(cor, cor_ref)


def test_gradcheck_fp64():
    """Exact double-precision gradient check for hidden and weight, chunked and tempered."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, -100, 2])  # includes an ignored target

    def fn(h, w):
        return token_logprobs_from_hidden(h, w, targets, chunk_size=2, temperature=0.8)[0]

    assert fn(hidden, weight).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_ignored_targets_are_zero_with_no_gradient():
    hidden, weight, targets = _data()
    targets[[2, 7]] = -100
    h = hidden.clone().requires_grad_(True)
    logp, _, cor = token_logprobs_from_hidden(h, weight, targets, chunk_size=4, with_accuracy=True)
    assert logp[2] == 0 and logp[7] == 0 and not cor[2] and not cor[7]
    logp.sum().backward()
    assert (h.grad[[2, 7]] == 0).all() and (h.grad[0] != 0).any()


@pytest.mark.parametrize("which", ["hidden", "weight", "none"])
def test_partial_requires_grad(which):
    """Frozen head (LoRA) or frozen inputs: only the needed gradient is computed."""
    hidden, weight, targets = _data()
    h = hidden.clone().requires_grad_(which == "hidden")
    w = weight.clone().requires_grad_(which == "weight")
    logp, _, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=3)
    if which == "none":
        assert not logp.requires_grad
        return
    logp.sum().backward()
    assert (h.grad is not None) == (which == "hidden")
    assert (w.grad is not None) == (which == "weight")


def test_bf16_inputs_compute_in_fp32():
    """bf16 hidden/weight: logits cast to fp32 before log-softmax; grads come back in bf16.
    Compared to the fp64 reference on the same bf16-rounded inputs; tolerance 0.05 covers the
    bf16 rounding of the matmul output only (log-softmax itself is fp32)."""
    hidden, weight, targets = _data()
    hb = hidden.bfloat16().requires_grad_(True)
    wb = weight.bfloat16().requires_grad_(True)
    logp, ent, _ = token_logprobs_from_hidden(hb, wb, targets, chunk_size=4, with_entropy=True)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref, _ent_ref, _ = _naive(hb.detach().float(), wb.detach().float(), targets)
    torch.testing.assert_close(logp.double(), ref, atol=0.05, rtol=0)
    logp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert torch.isfinite(hb.grad.float()).all()


def test_autocast_uses_the_autocast_dtype_consistently():
    """Under bf16 autocast with fp32 leaves (mixed-precision training), the matmul runs in bf16
    as the model's lm_head would, the log-softmax in fp32, and the gradients land in fp32,
    matching plain autograd through the bf16-cast inputs (tolerance: bf16 rounding, 0.05)."""
    hidden, weight, targets = _data()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _, _ = token_logprobs_from_hidden(h1, w1, targets, chunk_size=3)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    z = (h2.bfloat16() @ w2.bfloat16().T).float()
    ref = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    ref.sum().backward()
    torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0.02, atol=0.05)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0.02, atol=0.05)


def test_autocast_casts_the_head_weight_once_per_call_not_per_chunk():
    """Under bf16 autocast the fp32 (V, H) head weight becomes bf16 once per call, and the backward
    reuses that copy: a per-chunk cast would read and write the whole matrix once per chunk (28 M
    parameters for SmolLM2's head). chunk_size 1 gives N chunks, so any per-chunk cast shows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountHeadCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (V, H) \
                    and args[0].dtype != out.dtype:
                self.casts += 1
            return out

    hidden, weight, targets = _data()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with CountHeadCasts() as forward:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, _, _ = token_logprobs_from_hidden(h, w, targets, chunk_size=1)
    with CountHeadCasts() as backward:
        logp.sum().backward()
    assert forward.casts == 1
    # the fp32-accumulated gradient to the bf16 copy's dtype, then autograd's back to the fp32 leaf
    assert backward.casts == 2


def test_no_full_logits_saved_for_backward():
    """Autograd keeps hidden, weight, targets and N log-sum-exps: nothing of size N x V."""
    n, h, v = 64, 8, 1000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _logp, _, _ = token_logprobs_from_hidden(hidden, weight, targets, chunk_size=16)
    assert max(saved) < n * v
    assert sum(saved) <= n * h + v * h + 2 * n


def test_bad_shapes_raise():
    hidden, weight, targets = _data()
    with pytest.raises(ValueError, match="mismatch"):
        token_logprobs_from_hidden(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(hidden, weight, targets, chunk_size=0)


# ---------------------------------------------------------------- LogProbModel on a tiny Llama
# A 1024-token vocabulary keeps these fast; nothing here depends on the real tokenizer.
TINY_V = 1024


def _tiny():
    return make_tiny_llama(vocab_size=TINY_V)


def _tiny64():
    """For identities (kernel == naive, packed == separate): float64, tolerances in tests/numerics.py."""
    return make_tiny_llama(vocab_size=TINY_V).double()


def _naive_model_logps(model, input_ids, attention_mask=None, position_ids=None):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)


def _padded_batch(padding_side="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 5, 7]
    t = max(lengths)
    ids = torch.full((3, t), 2, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, TINY_V, (n,), generator=g)
        if padding_side == "right":
            ids[i, :n], mask[i, :n] = row, 1
        else:
            ids[i, t - n :], mask[i, t - n :] = row, 1
    return ids, mask


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logprob_model_matches_naive_padded(padding_side):
    """Values and parameter gradients equal log_softmax(model(...).logits) gathered, on real
    target positions; padded positions are exactly 0."""
    model = _tiny64()
    ids, mask = _padded_batch(padding_side)
    wrapped = LogProbModel(model, chunk_size=5)
    out = wrapped(ids, attention_mask=mask, with_entropy=True, with_accuracy=True)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    ref = _naive_model_logps(model, ids, mask)
    assert out["logps"].shape == (3, ids.shape[1] - 1) and out["logps"].dtype == torch.float64
    torch.testing.assert_close(out["logps"][valid], ref[valid], rtol=EXACT64_REL, atol=EXACT64_ABS)
    assert (out["logps"][~valid] == 0).all() and (out["entropy"][~valid] == 0).all()
    assert (out["entropy"][valid] > 0).all()

    out["logps"][valid].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref[valid].sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=EXACT64_REL, atol=EXACT64_ABS, msg=n)


def test_pitfall_06_packed_row_equals_separate_rows_no_cross_attention():
    """Padding-free packing (pitfall 6): a B=1 row of two examples with restarting position_ids
    and no attention mask gives each example's log-probs (and gradients) as if run alone; the
    same row without position_ids (cross-attention) differs, so the test can fail."""
    model = _tiny64()
    wrapped = LogProbModel(model, chunk_size=4)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(3, TINY_V, (1, 5), generator=g)
    b = torch.randint(3, TINY_V, (1, 7), generator=g)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]

    out = wrapped(packed, position_ids=pos)["logps"]
    sep_a, sep_b = wrapped(a)["logps"], wrapped(b)["logps"]
    # position 4 predicts b's first token from a's last: a boundary the caller masks
    torch.testing.assert_close(out[:, :4], sep_a, rtol=EXACT64_REL, atol=EXACT64_ABS)
    torch.testing.assert_close(out[:, 5:], sep_b, rtol=EXACT64_REL, atol=EXACT64_ABS)
    unpacked = wrapped(packed)["logps"]
    assert not torch.allclose(unpacked[:, 5:], sep_b, atol=1e-3)

    keep = torch.ones_like(out, dtype=torch.bool)
    keep[0, 4] = False
    out[keep].sum().backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (sep_a.sum() + sep_b.sum()).backward()
    for gp, p in zip(g_packed, model.parameters()):
        torch.testing.assert_close(gp, p.grad, rtol=EXACT64_REL, atol=EXACT64_ABS)


def test_pitfall_11_bf16_logprobs_match_fp32():
    """The same tiny model in bf16 and in fp32 gives the same log-probs to bf16 precision:
    |lp16 - lp32| <= 0.05 + 0.01 * |lp32| per token (bf16 keeps ~8 bits of mantissa, 0.4%
    relative, in weights and activations) and mean |diff| < 0.05 nats; all finite, fp32 out.
    Embeddings are scaled x30 so log-probs spread over [-25, 0] instead of all ~ -ln V."""
    model = _tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)
    ids, mask = _padded_batch("right", seed=5)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    with torch.no_grad():
        lp32 = LogProbModel(model)(ids, attention_mask=mask)["logps"]
        lp16 = LogProbModel(model.to(torch.bfloat16))(ids, attention_mask=mask)["logps"]
    assert lp16.dtype == torch.float32 and torch.isfinite(lp16).all()
    assert lp32[valid].min() < -10  # the test is not trivially near-uniform
    torch.testing.assert_close(lp16[valid], lp32[valid], rtol=0.01, atol=0.05)
    assert (lp16 - lp32)[valid].abs().mean() < 0.05


def test_pitfall_18_fallback_head_logps_and_entropy_match_naive():
    """A LoRA-wrapped lm_head is not a plain nn.Linear: the checkpointed per-chunk fallback must
    still equal the naive log-softmax of the peft model's logits, and train the head's LoRA."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny64(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    wrapped = LogProbModel(model, chunk_size=4)
    ids, mask = _padded_batch("right")
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    out = wrapped(ids, attention_mask=mask, with_entropy=True, with_accuracy=True)
    ref = _naive_model_logps(model, ids, mask)
    torch.testing.assert_close(out["logps"][valid], ref[valid], rtol=EXACT64_REL, atol=EXACT64_ABS)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        naive_entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(out["entropy"][valid], naive_entropy[valid], rtol=EXACT64_REL, atol=EXACT64_ABS)
    assert (out["entropy"][valid] > 0).all()
    out["logps"][valid].sum().backward()
    head_lora = [p for n, p in model.named_parameters() if "lm_head" in n and "lora" in n]
    assert head_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_lora)


def test_logprob_model_softcapping_fallback():
    """final_logit_softcapping (Gemma 2 style): z = c * tanh(z / c) before the log-softmax."""
    model = _tiny64()
    model.config.final_logit_softcapping = 0.5
    ids, mask = _padded_batch("right")
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    out = LogProbModel(model, chunk_size=4)(ids, attention_mask=mask)["logps"]
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        z = 0.5 * torch.tanh(z / 0.5)
        ref = torch.log_softmax(z, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    torch.testing.assert_close(out[valid], ref[valid], rtol=EXACT64_REL, atol=EXACT64_ABS)


def test_check_packing_support():
    model = _tiny()
    check_packing_support(model)  # sdpa
    check_packing_support(LogProbModel(model))

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_attn_implementation": "my_custom_kernel"})()

    with pytest.raises(ValueError, match="packed"):
        check_packing_support(Fake())


def test_target_mask_scores_only_targets_and_matches_full():
    """Positions outside target_mask come back 0 and the scored ones equal the unmasked run."""
    model = _tiny()
    wrapped = LogProbModel(model, chunk_size=3)
    ids = torch.randint(3, TINY_V, (2, 9), generator=torch.Generator().manual_seed(1))
    full = wrapped(ids)["logps"]
    tm = torch.zeros(2, 8, dtype=torch.bool)
    tm[0, 4:] = True
    tm[1, 2:5] = True
    part = wrapped(ids, target_mask=tm)["logps"]
    torch.testing.assert_close(part[tm], full[tm])
    assert (part[~tm] == 0).all()
