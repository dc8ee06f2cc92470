"""Which examples go into which micro-batch of which optimizer step, on which process.

The plan is a pure function of (step, process): every epoch is a seeded permutation of the
"units" (single examples, or packed bins of examples), cut into optimizer steps of
`micro_batch_size × accumulation × world_size` units. Micro-batch k of a step goes to process
k mod world_size. So the data position of a run is just its step number (resume needs nothing
else), and 1 process × 2 accumulation sees exactly the examples that 2 processes × 1 do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BatchPlan:
    units: list[list[int]]  # each unit: indices of the examples that fill one sequence slot
    micro_batch_size: int  # units per micro-batch
    accumulation: int  # micro-batches per process per optimizer step
    world_size: int
    seed: int
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    @property
    def units_per_step(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.units) // self.units_per_step

    @property
    def unused_units_per_epoch(self) -> int:
        """Units left over each epoch because the data is not a multiple of a step (reshuffled,
        so a different remainder each epoch)."""
        return len(self.units) - self.steps_per_epoch * self.units_per_step

    def require_one_step(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.units)} training rows cannot fill one optimizer step of "
                             f"{self.units_per_step}; lower --per_device_train_batch_size or "
                             "--gradient_accumulation_steps")

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.units), generator=gen).tolist()}
        return self._orders[epoch]

    def step_micro_batches(self, step: int, process_index: int = 0) -> list[list[int]]:
        """Example indices of each of this process's micro-batches for optimizer step `step`."""
        if self.steps_per_epoch == 0:
            raise ValueError("the data does not fill one optimizer step")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = within * self.units_per_step
        step_units = order[start : start + self.units_per_step]
        mbs = self.micro_batch_size
        micro = [step_units[i * mbs : (i + 1) * mbs] for i in range(self.accumulation * self.world_size)]
        mine = micro[process_index :: self.world_size]
        return [[ex for unit in mb for ex in self.units[unit]] for mb in mine]

    def all_step_micro_batches(self, step: int) -> list[list[int]]:
        """Every process's micro-batches of a step (for computing global normalisers on one process)."""
        out: list[list[int]] = []
        for p in range(self.world_size):
            out.extend(self.step_micro_batches(step, p))
        return out


def total_steps(plan: BatchPlan, max_steps: int, num_train_epochs: float) -> int:
    if max_steps > 0:
        return max_steps
    return max(1, int(round(plan.steps_per_epoch * num_train_epochs)))
