"""Pitfall 27: every recipe on 2 CPU processes (gloo) == 1 process with the doubled step batch;
metrics global; the ranks sample differently; no prompt twice per epoch; save and resume on 2
processes. The harness (harness.py) says exactly what each run is and why the tolerances hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.demo.tasks import generate, generate_preferences
from tests.distributed.harness import (
    FLOAT64_OPTIONS,
    LR,
    Case,
    assert_same_row,
    assert_same_weights,
    launch,
    metrics,
    run_case,
)
from tests.numerics import EXACT64_ABS, EXACT64_REL

pytestmark = pytest.mark.slow

REWARD = "tests.distributed.rank_rewards:logged_length"


@pytest.fixture()
def data(tmp_path):
    def write(name, rows):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    chat, _ = generate(seed=11, n_train=16, n_eval=0)
    pairs, _ = generate_preferences(seed=17, n_train=16, n_eval=0)
    # 8 prompts of the SAME text (told apart by uid): two ranks given it must still sample differently
    question = [{"role": "user", "content": "Count to three."}]
    prompts = [{"prompt": question, "uid": i} for i in range(8)]
    return {"chat": write("chat", chat), "pairs": write("pairs", pairs), "prompts": write("prompts", prompts)}


ONLINE = {"reward_funcs": REWARD, "max_completion_length": 8}


def cases(model, data) -> dict[str, Case]:
    common = {"model_name_or_path": model, **FLOAT64_OPTIONS}
    return {
        "sft": Case("sft", {**common, "dataset_name": data["chat"], "max_length": 96}),
        "reward": Case("reward", {**common, "dataset_name": data["pairs"], "eval_split_ratio": 0.0}),
        "dpo": Case("dpo", {**common, "dataset_name": data["pairs"]}),
        "kto": Case("kto", {**common, "dataset_name": data["pairs"]}),
        # 4 completions per rank per step = 2 prompts x 2 generations; 8 prompts = 2 steps = one epoch
        **{f"grpo-{loss}": Case("grpo", {**common, **ONLINE, "dataset_name": data["prompts"], "num_generations": 2,
                                         "loss_type": loss, "beta": 0.1}, online=True)
           for loss in ("grpo", "dr_grpo", "dapo", "bnpo")},
        "rloo": Case("rloo", {**common, **ONLINE, "dataset_name": data["prompts"], "num_generations": 2,
                              "beta": 0.1}, online=True),
        "ppo": Case("ppo", {**common, **ONLINE, "dataset_name": data["prompts"], "num_generations": 2,
                            "value_head_on_policy": True, "num_ppo_epochs": 1, "kl_coef": 0.1}, online=True),
        # 2 pairs per rank per step (batch 2 pairs = 4 sequences)
        "online-dpo": Case("online-dpo", {**common, **ONLINE, "dataset_name": data["prompts"]}, batch=4,
                           online=True),
    }


RECIPES = ["sft", "reward", "dpo", "kto", "grpo-grpo", "grpo-dr_grpo", "grpo-dapo", "grpo-bnpo", "rloo", "ppo",
           "online-dpo"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_pitfall_27_two_processes_equal_one_with_the_doubled_batch(recipe, tmp_path, tiny_model_dir, data):
    run_case(cases(tiny_model_dir, data)[recipe], tmp_path)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_pitfall_27_cpu_launch_without_accelerate_use_cpu_is_one_real_run(launcher, tmp_path, tiny_model_dir,
                                                                        data):
    """torchrun / `accelerate launch --multi_gpu` on a machine without a GPU, ACCELERATE_USE_CPU
    unset: once, 2 processes that each trained alone into one output dir; now one 2-process run."""
    proc = launch("sft", {"model_name_or_path": tiny_model_dir, "dataset_name": data["chat"], "max_length": 96,
                          "output_dir": tmp_path / "run", "max_steps": 1, "per_device_train_batch_size": 2,
                          "save_steps": 0, "disable_tqdm": True}, processes=2, launcher=launcher)
    out = proc.stdout + proc.stderr
    assert out.count("processes: 2") == 1 and "processes: 1" not in out


# sft, dpo and grpo: the three kinds of forward (packed NLL, chosen+rejected with a reference, a
# sampler that calls the causal LM outside the root's forward)
@pytest.mark.parametrize("recipe", ["sft", "dpo", "grpo-grpo"])
def test_pitfall_28_fsdp2_first_steps_equal_ddp(recipe, tmp_path, tiny_model_dir, data):
    """The same 2-process run with the module sharded by FSDP2 (tests/distributed/fsdp2_entry.py:
    fully_shard per decoder layer, then the root LogProbModel, as accelerate's FSDP2 does). Same
    logged losses, grad norms, metrics and weights as DDP: the arithmetic differs only in how the
    gradients are summed (all-reduce vs reduce-scatter) and the grad norm over shards: float64,
    tests/numerics.py. GRPO samples from the same full weights, so the same completions.

    The final model and checkpoints/step-1's model are written by posttrain's own save path, which
    gathers the full weights (models/saving.py full_state_dict): not rank 0's shards. They load with
    from_pretrained and equal DDP's. GRPO's sampler all-gathers each FSDP2 group once per rollout."""
    from transformers import AutoModelForCausalLM

    case = cases(tiny_model_dir, data)[recipe]
    base = {**case.options, "per_device_train_batch_size": case.batch, "learning_rate": LR, "logging_steps": 1,
            "disable_tqdm": True, "seed": 5, "max_grad_norm": 0.0, "max_steps": 2, "save_steps": 1}
    ddp, fsdp, gathers = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "gathers"
    launch(case.command, {**base, "output_dir": ddp}, processes=2)
    launch(case.command, {**base, "output_dir": fsdp}, processes=2, entry="tests.distributed.fsdp2_entry",
           extra_env={"POSTTRAIN_TEST_GATHER_LOG": str(gathers)})
    for a, b in zip(metrics(ddp), metrics(fsdp), strict=True):
        assert_same_row(a, b)
    step1 = "checkpoints/step-000001"
    for sub in (".", step1):
        assert_same_weights(ddp / sub, fsdp / sub)
        want = AutoModelForCausalLM.from_pretrained(ddp / sub, dtype=torch.float64).state_dict()
        got = AutoModelForCausalLM.from_pretrained(fsdp / sub, dtype=torch.float64).state_dict()
        assert got.keys() == want.keys()
        for k in want:  # float64 throughout: the tolerance of assert_same_weights
            torch.testing.assert_close(got[k], want[k], rtol=EXACT64_REL, atol=EXACT64_ABS, msg=k)
    if case.online:
        for rank in (0, 1):
            rollouts = [json.loads(x) for x in Path(f"{gathers}.{rank}").read_text().splitlines()]
            assert len(rollouts) == 2  # one per step
            for r in rollouts:
                # once per rollout: one all-gather per FSDP2 group (each layer, the root); gathering
                # per forward would be groups x (1 prefill + completion tokens - 1) of them
                assert r["all_gathers"] == r["groups"] and r["tokens"] > 2, r
