"""Loading tokenizers and models: local dirs, GGUF caching, dtypes, safetensors only."""

from __future__ import annotations

import inspect
import json
import os
import shutil

import pytest
import torch

from posttrain.models import loading
from posttrain.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from tests.conftest import make_tiny_llama


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    # auto = fp32 master weights on every device (pitfall 23); autocast is engine/precision.py's
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype("float8")


def test_load_local_dir_same_weights_and_dtype(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), dtype="float32")
    ref = make_tiny_llama()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    bf = load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    assert next(bf.parameters()).dtype == torch.bfloat16


def test_load_with_gradient_checkpointing(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False


def test_pickle_only_dir_is_refused_without_unpickling(tmp_path, tiny_model_dir, monkeypatch):
    """A dir with only pytorch_model.bin is a clear error, and torch.load is never called."""
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="safetensors"):
        load_causal_lm(str(d))


def test_safe_and_no_remote_code_defaults(monkeypatch, tiny_model_dir):
    """Every load asks for safetensors and, unless told, refuses remote code."""
    from transformers import AutoModelForCausalLM

    assert inspect.signature(load_causal_lm).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_tokenizer).parameters["trust_remote_code"].default is False
    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        return make_tiny_llama(vocab_size=64)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    load_causal_lm("some-org/some-model", attn_implementation="eager")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert seen["attn_implementation"] == "eager"


def test_load_tokenizer_sets_pad_to_eos_when_missing(tmp_path, tokenizer):
    d = tmp_path / "tok"
    tokenizer.save_pretrained(d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(str(d))
    assert tok.pad_token == tok.eos_token and tok.pad_token is not None
    assert tok.chat_template == tokenizer.chat_template


def test_gguf_is_converted_once_and_cached(tmp_path, monkeypatch, tokenizer):
    """A .gguf path converts into $POSTTRAIN_CACHE once, keyed by path/size/mtime; a changed
    file converts again. (The real conversion is exercised by the slow test below.)"""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(out_dir)
        make_tiny_llama(vocab_size=49152).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return out_dir

    monkeypatch.setattr(loading, "convert_gguf_to_hf_dir", fake_convert)
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF-fake")
    m1 = load_causal_lm(str(gguf))
    tok = load_tokenizer(str(gguf))
    m2 = load_causal_lm(str(gguf))
    assert len(calls) == 1 and calls[0].parent == tmp_path / "cache" / "models"
    assert tok.chat_template == tokenizer.chat_template
    torch.testing.assert_close(m1.lm_head.weight, m2.lm_head.weight)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_causal_lm(str(gguf))
    assert len(calls) == 2 and calls[1] != calls[0]
    with pytest.raises(FileNotFoundError):
        load_causal_lm(str(tmp_path / "missing.gguf"))


def test_default_model_and_its_gguf_resolve_to_the_cached_dir():
    from posttrain.models.default_model import default_gguf_path, default_model_dir

    assert loading._resolve_source(None) == str(default_model_dir())
    assert loading._resolve_source(str(default_gguf_path())) == str(default_model_dir())


@pytest.mark.slow
def test_load_default_model_once():
    """The embedded default (None) loads from its cached conversion and speaks its tokenizer."""
    model = load_causal_lm(None, dtype="float32")
    tok = load_tokenizer(None)
    assert model.config.vocab_size >= len(tok) and tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 3


@pytest.mark.slow
def test_real_gguf_conversion(tmp_path, monkeypatch):
    """Convert the embedded GGUF afresh through the generic .gguf path (a copy, so it is not
    recognised as the default) and check the result matches the cached default's weights."""
    from posttrain.models.default_model import default_gguf_path

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "smol.gguf"
    shutil.copy(default_gguf_path(), copy)
    model = load_causal_lm(str(copy), dtype="float32")
    tok = load_tokenizer(str(copy))
    monkeypatch.delenv("POSTTRAIN_CACHE")
    ref = load_causal_lm(None, dtype="float32")
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight)
    assert tok.chat_template


def test_adapter_dir_loads_base_plus_adapter(tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel

    from posttrain.models.lora import apply_lora
    from posttrain.models.saving import save_pretrained_model

    model = apply_lora(load_causal_lm(str(tiny_model_dir)), r=4)
    out = save_pretrained_model(model, tokenizer, tmp_path / "adapter")
    loaded = load_causal_lm(str(out))
    assert isinstance(loaded, PeftModel)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "lora" in n)
