"""`python -m tests.distributed.fsdp2_entry <command> ...` under torchrun: the posttrain CLI with
the prepared module sharded by torch's FSDP2 (`fully_shard` on each decoder layer, the backbone,
then the root), as accelerate's FSDP2 plugin does on GPUs — which accelerate ignores on CPU (the
run stays MULTI_CPU), so the CPU test applies it here. The final save gathers the full state dict
on every rank (torch.distributed.checkpoint) and rank 0 writes model.safetensors."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard


def _shard(self, model, *args, **kwargs):
    inner = model.model  # LogProbModel -> the HF causal LM
    backbone = inner.get_base_model().model if hasattr(inner, "get_base_model") else inner.model
    for layer in backbone.layers:
        fully_shard(layer)
    fully_shard(backbone)
    fully_shard(model)
    self._models.append(model)
    return model


def _save_full(self, model, tokenizer, **kwargs):
    from safetensors.torch import save_file

    # full_tensor() is a collective: every rank gathers, in the same (state dict) order
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    if self.accelerator.is_main_process:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state.pop("lm_head.weight", None)  # tied to the embeddings (as save_pretrained drops it)
        save_file(state, self.output_dir / "model.safetensors")
    self.accelerator.wait_for_everyone()


if __name__ == "__main__":
    from posttrain.cli import main
    from posttrain.engine.session import TrainingSession

    Accelerator.prepare_model = _shard
    TrainingSession.save_model = _save_full
    torch.manual_seed(0)
    sys.exit(main(sys.argv[1:]))
