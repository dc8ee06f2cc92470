"""`python -m tests.distributed.fsdp2_entry <command> ...` under torchrun: the posttrain CLI with
the prepared module sharded by torch's FSDP2 (`fully_shard` on each decoder layer, then the
root), as accelerate's FSDP2 plugin does on GPUs — which accelerate ignores on CPU (the
run stays MULTI_CPU), so the CPU test applies it here. The final save gathers the full state dict
on every rank (torch.distributed.checkpoint) and rank 0 writes model.safetensors."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard


def _shard(model):
    inner = model.model  # LogProbModel -> the HF causal LM
    backbone = inner.get_base_model().model if hasattr(inner, "get_base_model") else inner.model
    for layer in backbone.layers:
        fully_shard(layer)
    # the root holds the rest: the tied embedding / lm_head must sit in ONE group (FSDP2 refuses a
    # parameter shared by two groups), as accelerate's FSDP2 (auto-wrapped layers + root) does
    fully_shard(model)


def _prepare_sharded(self, module, optimizer, scheduler):
    """Shard, then point the optimizer at the sharded (DTensor) parameters, as accelerate's FSDP2
    path does (fully_shard replaces every parameter; an optimizer built before would step the old
    ones); accelerate wraps optimizer and scheduler; the module gets no DDP."""
    names = {id(p): n for n, p in module.named_parameters()}
    _shard(module)
    sharded = dict(module.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    self._models.append(module)
    return module, self.prepare_optimizer(optimizer), self.prepare_scheduler(scheduler)


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

    Accelerator.prepare = _prepare_sharded
    TrainingSession.save_model = _save_full
    torch.manual_seed(0)
    sys.exit(main(sys.argv[1:]))
