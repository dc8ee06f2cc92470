"""disable_dropout and eval_mode (pitfall 25) on a tiny Llama whose only dropouts are the
attention dropout of its config (Llama has no hidden or embedding dropout) and LoRA's."""

from __future__ import annotations

import torch

from posttrain.models.dropout import disable_dropout, eval_mode
from posttrain.models.lora import apply_lora
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 520, 9531, 198, 22, 2, 17, 40, 41, 42]])


def dropout_llama(p: float = 0.1, lora_dropout: float = 0.1):
    """A tiny Llama as loaded from a config with attention_dropout = p (LlamaAttention copies it
    into self.attention_dropout at init), with a LoRA adapter whose dropout is `lora_dropout`."""
    model = make_tiny_llama()
    model.config.attention_dropout = p
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return apply_lora(model, r=4, dropout=lora_dropout)


def _train_logits(model):
    model.train()
    with torch.no_grad():
        return model(IDS).logits


def test_pitfall_25_disable_dropout_zeroes_attention_and_lora_dropout():
    torch.manual_seed(0)
    model = dropout_llama()
    assert not torch.equal(_train_logits(model), _train_logits(model))  # dropout is really on
    n_lora = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert disable_dropout(model) == n_lora + len(model.base_model.model.model.layers)
    a, b = _train_logits(model), _train_logits(model)
    assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(a, model.eval()(IDS).logits)  # train mode == eval mode, bit for bit
    assert model.config.attention_dropout == 0.1  # the saved config stays the user's
    assert disable_dropout(model) == 0


def test_eval_mode_restores_each_module_as_it_was():
    model = dropout_llama()
    model.train()
    frozen = model.base_model.model.model.layers[0]
    frozen.eval()  # deliberately in eval; a blanket train() afterwards would wake it
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            x, y = model(IDS).logits, model(IDS).logits
        assert torch.equal(x, y)  # dropout-free even though dropout is configured
    assert model.training and not frozen.training and not any(m.training for m in frozen.modules())
    assert model.base_model.model.model.layers[1].training
