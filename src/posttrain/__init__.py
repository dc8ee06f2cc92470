"""posttrain: post-train language models — SFT, reward models, DPO, KTO, PPO, GRPO, RLOO, Online DPO.

    from posttrain import sft, SFTConfig
    result = sft(SFTConfig(dataset_name="chat.jsonl", output_dir="out", max_steps=20))

Recipes import torch/transformers only when called, so `import posttrain` stays light.
"""

from __future__ import annotations

from posttrain.config import SFTConfig

__version__ = "0.1.0"
__all__ = ["SFTConfig", "sft", "__version__"]


def sft(config: SFTConfig, model=None, tokenizer=None, dataset=None):
    """Supervised fine-tuning; see posttrain.recipes.sft.sft."""
    from posttrain.recipes.sft import sft as run

    return run(config, model=model, tokenizer=tokenizer, dataset=dataset)
