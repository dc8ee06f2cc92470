"""Shared fixtures: the real SmolLM2 tokenizer and chat template, tiny random-initialised models."""

from __future__ import annotations

import os

import pytest
import torch

# Tests pin the precision they mean: --bf16 unset (auto) would be bf16 autocast on a CPU with
# AMX/AVX512-BF16 or a bf16 GPU and fp32 elsewhere, so here auto means fp32 on every machine (also in
# the CLI subprocesses, which inherit the environment). A test about bf16 sets --bf16 / bf16=True.
os.environ["POSTTRAIN_AUTO_PRECISION"] = "fp32"


@pytest.fixture(scope="session")
def smol_tokenizer_dir():
    """Directory of the embedded default model (converted from the GGUF once, then cached)."""
    from posttrain.models.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def _tokenizer_session(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture()
def tokenizer(_tokenizer_session):
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template, pad == eos == <|im_end|>)."""
    return _tokenizer_session


class StopAfterCheckpoint:
    """Stands in for engine.session.GracefulStop: 'signals' once a given checkpoint exists (a
    deterministic kill, for exact-resume tests)."""

    def __init__(self, marker):
        self.marker = marker
        self.signal_name = "SIGTERM"

    @property
    def requested(self) -> bool:
        return self.marker.exists()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    """A tiny random Llama with SmolLM2's vocabulary, so the real tokenizer drives it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model


@pytest.fixture()
def tiny_model():
    """A fresh tiny random-initialised Llama (fp32, sdpa attention), seeded for reproducibility."""
    return make_tiny_llama()


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer):
    """The tiny model saved as a Hugging Face directory with the real tokenizer beside it."""
    model = make_tiny_llama()
    out = tmp_path / "tiny-model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
