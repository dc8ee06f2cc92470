"""LoRA through peft, with gradient checkpointing (pitfall 21)."""

from __future__ import annotations

import torch

from posttrain.losses import sft_nll_loss
from posttrain.models.loading import load_causal_lm
from posttrain.models.logprobs import LogProbModel
from posttrain.models.lora import apply_lora


def test_apply_lora_defaults_all_linear(tiny_model):
    model = apply_lora(tiny_model, r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n for n in trainable), proj
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output head alone


def test_pitfall_21_lora_gradient_checkpointing_trains(tiny_model_dir):
    """Load with gradient checkpointing, add LoRA, train two AdamW steps through LogProbModel.
    peft initialises lora_B = 0, so at step 1 only B can get gradient (dL/dA = B^T(...) = 0);
    from step 2 on every trainable parameter must have a nonzero gradient, and after it every
    one must have changed from its initial value."""
    model = load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True)
    model = apply_lora(model, r=4, dropout=0.0, gradient_checkpointing=True)
    model.train()
    assert model.get_base_model().is_activation_checkpointing
    wrapped = LogProbModel(model, chunk_size=8)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[1, 330, 2517, 314, 253, 1975, 30, 2]] * 2)
    mask = torch.ones(2, 7)
    for step in (1, 2):
        opt.zero_grad()
        loss = sft_nll_loss(wrapped(ids)["logps"], mask)
        loss.backward()
        if step == 1:
            assert all(params[n].grad.abs().sum() > 0 for n in params if "lora_B" in n)
        opt.step()
    dead = [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reached: {dead[:5]}"
    unchanged = [n for n, p in params.items() if torch.equal(p, initial[n])]
    assert not unchanged, f"not updated: {unchanged[:5]}"
