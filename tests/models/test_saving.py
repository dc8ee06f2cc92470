"""Saved artefacts reload and behave like the live model (pitfalls 5 and 20); saves are atomic."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.logprobs import LogProbModel
from posttrain.models.lora import apply_lora
from posttrain.models.saving import save_pretrained_model, unwrap_model
from tests.conftest import make_tiny_llama

IDS = torch.tensor([[1, 330, 2517, 314, 253, 1975, 30, 2], [1, 17, 18, 19, 20, 21, 22, 23]])

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
]


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_model(tiny_model_dir):
    """A LoRA model whose adapter is not the identity (peft initialises B = 0), so a lost or
    empty adapter would show in the logits."""
    from posttrain.models.loading import load_causal_lm

    model = apply_lora(load_causal_lm(str(tiny_model_dir)), r=4, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def _can_generate(model, tokenizer):
    with torch.no_grad():
        out = model.generate(
            IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert out.shape[1] > 4


def test_pitfall_20_saved_model_reloads(tmp_path, tokenizer):
    """Full model: reload with AutoModelForCausalLM; logits equal the live model's (atol 1e-5)."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    wrapped = LogProbModel(model)  # the training loop's wrapper is unwrapped by the saver
    out = save_pretrained_model(wrapped, tokenizer, tmp_path / "full")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)
    _can_generate(reloaded, tokenizer)


def test_pitfall_20_saved_adapter_reloads(tmp_path, tokenizer, tiny_model_dir):
    """LoRA adapter: reload with AutoPeftModelForCausalLM (base found via the adapter config);
    logits equal the live model's and differ from the bare base (the adapter is not empty)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_model_dir)
    out = save_pretrained_model(model, tokenizer, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(_logits(base), _logits(model), atol=1e-3)
    _can_generate(reloaded, tokenizer)


def test_pitfall_20_saved_merged_adapter_reloads(tmp_path, tokenizer, tiny_model_dir):
    """Merged adapter: a plain full model (no peft needed) with the same logits; the live model
    stays an unmerged peft model with the same outputs as before."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _lora_model(tiny_model_dir)
    before = _logits(model)
    out = save_pretrained_model(model, tokenizer, tmp_path / "merged", merge_adapter=True)
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(_logits(reloaded), before, rtol=0, atol=1e-5)
    assert isinstance(model, PeftModel) and any("lora_A" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    _can_generate(reloaded, tokenizer)


def test_pitfall_05_template_saved(tmp_path, tokenizer):
    """The saved tokenizer renders a conversation exactly as the training-time one did."""
    from transformers import AutoTokenizer

    out = save_pretrained_model(make_tiny_llama(), tokenizer, tmp_path / "m")
    reloaded = AutoTokenizer.from_pretrained(out)
    for gen in (False, True):
        conv = CONVERSATION[:-1] if gen else CONVERSATION
        a = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        b = reloaded.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert a == b
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.pad_token == tokenizer.pad_token and reloaded.eos_token == tokenizer.eos_token


def test_save_keeps_use_cache_for_inference(tmp_path, tokenizer, tiny_model_dir):
    """Gradient checkpointing turns use_cache off for training; the saved config has it on."""
    import json

    from posttrain.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True)
    out = save_pretrained_model(model, tokenizer, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False


def test_save_is_atomic_and_keeps_run_files(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    """Saving over an existing dir replaces the model files (a stale adapter disappears) and
    keeps the run's other files; a crash mid-save leaves the old dir intact and no temp dirs."""
    model = _lora_model(tiny_model_dir)
    out = save_pretrained_model(model, tokenizer, tmp_path / "run")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "state.txt").write_text("kept")

    full = make_tiny_llama()
    save_pretrained_model(full, tokenizer, out)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (out / "checkpoints" / "state.txt").read_text() == "kept"

    def crash(self, save_directory, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(full), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_model(full, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny-model"]
    assert (out / "model.safetensors").stat().st_size > 1000


def test_unwrap_and_safe_only(tmp_path, tokenizer):
    model = make_tiny_llama(vocab_size=64)

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(DDPLike(LogProbModel(model))) is model
    with pytest.raises(ValueError, match="safetensors"):
        save_pretrained_model(model, tokenizer, tmp_path / "x", safe=False)
