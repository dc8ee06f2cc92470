"""The critic of PPO: per-token values V(s_t), and the module PPO trains (policy + critic).

Two critics:

- :class:`ValueModel` — a separate one-output sequence classifier (by default the reward model,
  as TRL initialises its critic): its backbone runs over the whole sequence and its ``score`` head
  is applied to EVERY hidden state, not only the last real token as the reward read-out does.
- :class:`ValueHead` — a linear head on the policy's own final hidden states (one backbone for
  policy and critic; with LoRA also for the reference: one base model in memory).

Value alignment: entry t of the returned (B, T-1) values is V at hidden state t, the state in
which token t+1 is generated — the same indexing as :class:`posttrain.models.logprobs.LogProbModel`'s
log-probs, so one mask serves log-probs, values, rewards and advantages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.losses.reductions import upcast
from posttrain.models.logprobs import LogProbModel, full_weight


def _linear_fp32(head: nn.Module, hidden: Tensor) -> Tensor:
    """``head(hidden)[..., 0]`` in fp32 (also under bf16 autocast): values are regression outputs."""
    if type(head) is nn.Linear:
        with torch.autocast(hidden.device.type, enabled=False):  # full_weight: a DTensor shard under FSDP2
            dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32; a float64 run stays float64
            bias = None if head.bias is None else full_weight(head.bias).to(dtype)
            return F.linear(hidden.to(dtype), full_weight(head.weight).to(dtype), bias)[..., 0]
    return upcast(head(hidden))[..., 0]  # e.g. peft's ModulesToSaveWrapper around the score head


def _position_ids(attention_mask: Tensor) -> Tensor:
    # the count of real tokens before each one: left padding gets the positions right padding has
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueModel(nn.Module):
    """A separate critic: a one-output classifier read at every position.

    ``self.model`` is the HF (or peft) ``*ForSequenceClassification``; saved as such, so the
    critic dir can be passed back as ``--value_model_path`` (or used as a reward model).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        get_base = getattr(self.model, "get_base_model", None)
        inner = get_base() if callable(get_base) else self.model  # LoRA layers are injected in place
        backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
        head = getattr(inner, "score", None)
        if backbone is None or head is None:
            raise ValueError(f"{type(inner).__name__} has no backbone/score head; load it with load_reward_model")
        return backbone, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask (B, T), any padding side -> values (B, T-1) fp32 (0 where the
        position or the next one is padding)."""
        backbone, head = self._parts()
        out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=_position_ids(attention_mask), use_cache=False, return_dict=True)
        values = _linear_fp32(head, out.last_hidden_state[:, :-1])
        keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        return torch.where(keep, values, torch.zeros_like(values))


class ValueHead(nn.Module):
    """``V(h) = w·h + b`` on the policy's final hidden states; w ~ N(0, 1/(d+1)), b = 0 (small
    initial values, as the reward head's init)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.linear.weight.normal_(mean=0.0, std=1.0 / math.sqrt(hidden_size + 1))
            self.linear.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        return _linear_fp32(self.linear, hidden)


class PolicyWithCritic(nn.Module):
    """What PPO prepares with accelerate and trains with one optimizer: the policy
    (a LogProbModel) and the critic (a separate :class:`ValueModel`, or a :class:`ValueHead` on the
    policy's hidden states). One forward gives both, so DDP sees every trained parameter."""

    def __init__(self, policy: LogProbModel, critic: ValueModel | None = None, value_head: ValueHead | None = None):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("give exactly one of critic (a separate value model) and value_head")
        self.policy = policy
        self.critic = critic
        self.value_head = value_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, target_mask: Tensor | None = None,
                temperature: float = 1.0, with_entropy: bool = False) -> dict[str, Tensor]:
        """Right- or left-padded (B, T) batch -> ``{"logps", "entropy", "values"}``, each (B, T-1)
        fp32 in LogProbModel's indexing (entropy None unless asked)."""
        # the policy is called exactly as the reference is (reference.py), so KL is 0 at the start
        out = self.policy(input_ids, attention_mask=attention_mask, target_mask=target_mask, with_entropy=with_entropy, temperature=temperature,
                          return_hidden=self.value_head is not None)
        if self.value_head is not None:
            values = self.value_head(out.pop("hidden")[:, :-1])
            keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
            values = torch.where(keep, values, torch.zeros_like(values))
        else:
            values = self.critic(input_ids, attention_mask)
        return {"logps": out["logps"], "entropy": out["entropy"], "values": values}


def save_value_head(head: ValueHead, out_dir) -> None:
    """value_head.safetensors (weight (1, d), bias (1,)) in ``out_dir``."""
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.linear.state_dict().items()},
              out / "value_head.safetensors")


def load_value_model(config, *, policy_model: nn.Module | None, tokenizer, log=print) -> ValueModel:
    """The separate critic: from ``--value_model_path``, else ``--reward_model_path`` (TRL's
    default), else the starting policy's weights (``policy_model`` when given, else
    ``--model_name_or_path``) with a fresh value head. A reward LoRA adapter is merged into its base
    first; with ``--use_peft`` the critic gets its own LoRA (score head trained in full). Call it
    before LoRA is applied to ``policy_model``."""
    from posttrain.models.loading import model_load_kwargs
    from posttrain.models.reward_model import (
        load_reward_model,
        prepare_reward_model_for_training,
        reward_model_from_causal_lm,
    )

    pad = tokenizer.pad_token_id
    source = config.value_model_path or config.reward_model_path
    if source is None and policy_model is not None:
        model = reward_model_from_causal_lm(policy_model, pad)
        log("critic: separate value model from the starting policy's weights (fresh value head)")
    elif source is None and _is_causal_lm_adapter(config.model_name_or_path):
        # a chained LoRA stage (sft --use_peft → ppo): the critic starts from the SFT policy's
        # weights, i.e. base + adapter merged, with a fresh value head
        from posttrain.models.loading import load_causal_lm

        start = load_causal_lm(config.model_name_or_path, dtype=config.dtype,
                               attn_implementation=config.attn_implementation,
                               trust_remote_code=config.trust_remote_code).merge_and_unload()
        model = reward_model_from_causal_lm(start, pad)
        del start
        log("critic: separate value model from the starting adapter merged into its base (fresh value head)")
    else:
        source = source if source is not None else config.model_name_or_path
        model = load_reward_model(source, **model_load_kwargs(config, source),
                                  gradient_checkpointing=config.gradient_checkpointing, pad_token_id=pad)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()  # a LoRA reward model: the critic trains on the merged weights
        log(f"critic: separate value model initialised from {source or 'the embedded default'}")
    return ValueModel(prepare_reward_model_for_training(config, model, tokenizer, log))


def _is_causal_lm_adapter(path: str | None) -> bool:
    import json
    from pathlib import Path

    if path is None or not (Path(path) / "adapter_config.json").exists() or (Path(path) / "config.json").exists():
        return False
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type") == "CAUSAL_LM"


def value_head_for(policy_model: nn.Module) -> ValueHead:
    """A :class:`ValueHead` sized to ``policy_model``'s hidden states, on its device."""
    config = policy_model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ValueHead(text.hidden_size).to(next(policy_model.parameters()).device)
