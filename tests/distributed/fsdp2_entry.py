"""`python -m tests.distributed.fsdp2_entry <command> ...` under torchrun: the posttrain CLI with
the prepared module sharded by torch's FSDP2 (`fully_shard` on each decoder layer, then the
root), as accelerate's FSDP2 plugin does on GPUs — which accelerate ignores on CPU (the
run stays MULTI_CPU), so the CPU test applies it here. Saving is posttrain's own code path (it
gathers a sharded model's full state dict on every rank; rank 0 writes).

With $POSTTRAIN_TEST_GATHER_LOG set, every rollout appends to <that path>.<rank> one JSON line:
the FSDP2 all-gathers it ran and the number of FSDP2 parameter groups (pitfall 28: one each)."""

from __future__ import annotations

import json
import os
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


def _save_state_dcp(self, output_dir=None, **kwargs):
    """A checkpoint's training_state/ as accelerate's FSDP2 plugin writes it (torch.distributed.checkpoint,
    every rank its shards); accelerate's MULTI_CPU save_state cannot serialise DTensors. Resume
    under FSDP2 is not tested here (docs/distributed.md)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(self._models[0], self._optimizers[0].optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=output_dir)


def _count_gathers():
    """Count FSDP2's all-gathers (each is one parameter group's unshard) and log them per rollout."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from posttrain.rollout.generation import HFGenerationBackend

    count = [0]
    all_gather = _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        count[0] += 1
        return all_gather(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    generate = HFGenerationBackend.generate

    def logged(self, *args, **kwargs):
        before = count[0]
        rollout = generate(self, *args, **kwargs)
        groups = sum(len(m._get_fsdp_state()._fsdp_param_groups) for m in self.root.modules()
                     if isinstance(m, FSDPModule))
        with open(f"{os.environ['POSTTRAIN_TEST_GATHER_LOG']}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"all_gathers": count[0] - before, "groups": groups,
                                "tokens": sum(rollout.completion_lengths)}) + "\n")
        return rollout

    HFGenerationBackend.generate = logged


if __name__ == "__main__":
    from posttrain.cli import main

    Accelerator.prepare = _prepare_sharded
    Accelerator.save_state = _save_state_dcp
    if os.environ.get("POSTTRAIN_TEST_GATHER_LOG"):
        _count_gathers()
    torch.manual_seed(0)
    sys.exit(main(sys.argv[1:]))
