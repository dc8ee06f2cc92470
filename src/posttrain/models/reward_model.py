"""Scalar reward models: a causal-LM backbone with a one-output score head, read at the last REAL
token of each sequence (pitfall 9).

- :func:`load_reward_model` — ``AutoModelForSequenceClassification(num_labels=1)`` from a causal-LM
  checkpoint (an SFT output dir, a hub id, a .gguf, or ``None`` = the embedded default; same
  resolution and safetensors-only rules as :mod:`posttrain.models.loading`), or from a saved reward
  model / reward LoRA adapter. A freshly created score head is drawn from N(0, 1/(d+1))
  (Stiennon et al. 2020, "Learning to summarize from human feedback": the reward head's init).
- :class:`RewardScorer` — wraps the classifier so the training loop (and accelerate/DDP) calls one
  forward; it runs the backbone and applies the score head ONLY at each sequence's last real token,
  located from the attention mask (left or right padding) or from ``seq_lens`` (padding-free rows).
  Never from pad ids: with SmolLM2 pad == eos == ``<|im_end|>``, so Hugging Face's own
  "rightmost non-pad token" rule reads the token *before* the final ``<|im_end|>``.
- :class:`RewardModelReward` — a trained reward model as a reward function for the online methods.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from posttrain.models.loading import (
    _check_safetensors_dir,
    _resolve_source,
    enable_gradient_checkpointing,
    model_load_kwargs,
    resolve_dtype,
    upcast_trainable_parameters,
)
from posttrain.models.logprobs import full_weight


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def init_score_head(model: nn.Module) -> None:
    """Score head weights ~ N(0, 1/(d+1)), bias (if any) 0: initial rewards are small, O(1)."""
    head = _unwrap_peft(model).score
    d = head.weight.shape[-1]
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=1.0 / math.sqrt(d + 1))
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def _set_pad(model: nn.Module, pad_token_id: int | None) -> None:
    if pad_token_id is None:
        return
    config = _unwrap_peft(model).config
    config.pad_token_id = pad_token_id
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.pad_token_id = pad_token_id


def reward_model_from_causal_lm(causal_lm: nn.Module, pad_token_id: int | None = None) -> nn.Module:
    """A ``*ForSequenceClassification`` (num_labels=1) with ``causal_lm``'s backbone weights and a
    fresh score head (N(0, 1/(d+1))). For models built in Python (tests, notebooks)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config, dtype=next(causal_lm.parameters()).dtype)
    prefix = model.base_model_prefix
    getattr(model, prefix).load_state_dict(getattr(causal_lm, prefix).state_dict())
    init_score_head(model)
    _set_pad(model, pad_token_id if pad_token_id is not None else config.pad_token_id)
    return model


def _is_reward_model(model: nn.Module) -> bool:
    inner = _unwrap_peft(model)
    return hasattr(inner, "score") and getattr(inner.config, "num_labels", None) == 1


def as_reward_model(model: nn.Module, pad_token_id: int | None = None) -> nn.Module:
    """``model`` if it already is a one-output classifier, else converted from a causal LM."""
    if _is_reward_model(model):
        _set_pad(model, pad_token_id)
        return model
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return reward_model_from_causal_lm(model, pad_token_id)
    raise ValueError(f"{type(model).__name__} is neither a one-output sequence classifier nor a causal LM")


def load_reward_model(
    name_or_path: str | None,
    *,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    pad_token_id: int | None = None,
    is_trainable: bool = True,
):
    """``AutoModelForSequenceClassification(num_labels=1)`` from ``name_or_path``.

    - a causal LM (hub id, dir, .gguf, ``None`` = the embedded default): backbone from the
      checkpoint, new score head ~ N(0, 1/(d+1));
    - a saved reward model (its score weights are kept);
    - a reward LoRA adapter dir (adapter_config.json with task_type SEQ_CLS): its base, then the
      adapter (and its trained score head) on top (a ``PeftModel``).
    ``pad_token_id`` goes into ``config.pad_token_id`` (needed by HF's own batched forward; posttrain
    never reads scores by pad id). Safetensors only.
    """
    from transformers import AutoModelForSequenceClassification

    source = _resolve_source(name_or_path)
    path = Path(source)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return _load_reward_adapter(path, dtype=dtype, attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code,
                                    gradient_checkpointing=gradient_checkpointing, pad_token_id=pad_token_id,
                                    is_trainable=is_trainable)
    if path.is_dir():
        _check_safetensors_dir(path)
    kwargs = {"dtype": resolve_dtype(dtype), "revision": revision, "trust_remote_code": trust_remote_code,
              "use_safetensors": True, "num_labels": 1}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report calls the new score head "MISSING": expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if any(k.split(".")[0] == "score" for k in info.get("missing_keys", ())):
        init_score_head(model)  # created here, not read from the checkpoint
    _set_pad(model, pad_token_id)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _load_reward_adapter(path: Path, *, dtype, attn_implementation, trust_remote_code, gradient_checkpointing,
                         pad_token_id, is_trainable):
    from peft import PeftModel

    meta = json.loads((path / "adapter_config.json").read_text())
    if meta.get("task_type") not in ("SEQ_CLS", None):
        raise ValueError(
            f"{path} is a {meta.get('task_type')} adapter, not a reward-model (SEQ_CLS) one; to start a "
            "reward model from a LoRA SFT run, use its merged weights (posttrain sft --use_peft "
            "--merge_adapter writes OUTPUT_DIR/merged)")
    base_name = meta.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"adapter {path} does not name its base model (base_model_name_or_path)")
    base = load_reward_model(base_name, dtype=dtype, attn_implementation=attn_implementation,
                             trust_remote_code=trust_remote_code, gradient_checkpointing=gradient_checkpointing,
                             pad_token_id=pad_token_id)
    if gradient_checkpointing:
        base.enable_input_require_grads()  # pitfall 21
    return PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)


def last_token_index(attention_mask: Tensor | None = None, seq_lens: list[int] | Tensor | None = None) -> Tensor:
    """Flat index (into the (R*T,) flattened batch) of each sequence's last real token.

    attention_mask (S, T), 1 = real token, left or right padding: the last 1 of each row.
    seq_lens: lengths of the sequences concatenated in one padding-free row (R = 1).
    """
    if seq_lens is not None:
        lens = torch.as_tensor(seq_lens, dtype=torch.long)
        if lens.numel() and int(lens.min()) < 1:
            raise ValueError("every sequence needs at least one token")
        return lens.cumsum(0) - 1
    if attention_mask is None:
        raise ValueError("need attention_mask (padded batch) or seq_lens (padding-free row)")
    mask = attention_mask.bool()
    if not bool(mask.any(-1).all()):
        raise ValueError("a sequence has no real token (its attention_mask row is all 0)")
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).int().argmax(-1)  # the rightmost 1
    return last + torch.arange(mask.shape[0], device=mask.device) * T


class RewardScorer(nn.Module):
    """Scores sequences with a one-output classifier, reading each at its last real token.

    ``self.model`` is the wrapped HF (or peft) classifier; the training loop prepares the scorer
    (so DDP sees this forward) and saving unwraps to ``.model``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        inner = _unwrap_peft(self.model)  # LoRA layers are injected in place
        backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
        head = getattr(inner, "score", None)
        if backbone is None or head is None:
            raise ValueError(f"{type(inner).__name__} has no backbone/score head; load it with load_reward_model")
        return backbone, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                seq_lens: list[int] | Tensor | None = None) -> Tensor:
        """Scores (S,) fp32.

        Padded: input_ids, attention_mask (S, T), any padding side; position_ids default to the
        count of real tokens before each one, so left padding gives the positions right padding does.
        Padding-free: input_ids (1, N) holding S sequences, position_ids restarting at 0 per
        sequence, attention_mask None, seq_lens their S lengths (attention stays within each).
        """
        backbone, head = self._parts()
        if seq_lens is None and attention_mask is not None and position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if seq_lens is not None and position_ids is None:
            position_ids = torch.cat([torch.arange(n, device=input_ids.device) for n in seq_lens]).unsqueeze(0)
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, return_dict=True)
        hidden = out.last_hidden_state
        idx = last_token_index(attention_mask, seq_lens).to(hidden.device)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
        score_dtype = torch.promote_types(h.dtype, torch.float32)  # fp32 scores (fp64 stays fp64)
        if type(head) is nn.Linear:  # fp32 head (also under bf16 autocast): scores are fp32
            with torch.autocast(h.device.type, enabled=False):  # full_weight: a DTensor shard under FSDP2
                bias = None if head.bias is None else full_weight(head.bias).to(score_dtype)
                return F.linear(h.to(score_dtype), full_weight(head.weight).to(score_dtype), bias).squeeze(-1)
        return head(h).to(score_dtype).squeeze(-1)  # e.g. peft's ModulesToSaveWrapper


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModelReward:
    """A trained reward model as a reward function: ``rm(prompts, completions, **columns) -> list[float]``.

    prompts / completions: message lists (conversational) or strings, as the online methods pass
    them. Each pair is tokenised as in reward training — prompt and completion SEPARATELY, ids
    concatenated (pitfall 3), completion through its end-of-turn token — and scored at the last
    real token. Extra dataset columns are accepted and ignored.
    """

    name = "reward_model"
    __name__ = "reward_model"

    def __init__(self, path: str | None, device: str | torch.device | None = None, batch_size: int = 16,
                 *, dtype: str = "auto", attn_implementation: str | None = None, trust_remote_code: bool = False,
                 autocast: str = "no", max_length: int | None = None, model: nn.Module | None = None,
                 tokenizer=None):
        """dtype / attn_implementation / trust_remote_code / autocast ("no" | "bf16" | "fp16"): the
        policy's, as the online recipes pass them (models/loading.model_load_kwargs)."""
        from posttrain.models.loading import load_tokenizer

        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = batch_size
        self.max_length = max_length
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        if model is None:
            model = load_reward_model(path, dtype=dtype, attn_implementation=attn_implementation,
                                      trust_remote_code=trust_remote_code, pad_token_id=self.tokenizer.pad_token_id,
                                      is_trainable=False)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()  # a LoRA reward model: fold the adapter in once
        self.scorer = RewardScorer(model.to(self.device).eval())

    def tokenize(self, prompt, completion) -> list[int]:
        from posttrain.data.chat_masks import tokenize_prompt_completion

        conversational = isinstance(prompt, list)
        if conversational and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        ids, mask = tokenize_prompt_completion(prompt, completion, self.tokenizer, conversational=conversational,
                                               completion_only_loss=True)
        # through the completion's last trained token (its end-of-turn), as the training pairs are
        end = len(mask) - mask[::-1].index(1) if 1 in mask else len(ids)
        ids = ids[:end]
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[-self.max_length:]
        return ids

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [self.tokenize(p, c) for p, c in zip(prompts, completions)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths batch together
        scores = [0.0] * len(seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            T = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                out = self.scorer(ids.to(self.device), attention_mask=mask.to(self.device))
            for i, v in zip(chunk, out.tolist()):
                scores[i] = float(v)
        return scores


def prepare_reward_model_for_training(config, model=None, tokenizer=None, log=print):
    """The reward-model counterpart of :func:`posttrain.models.setup.prepare_model_for_training`:
    load (or convert a given causal LM), pad id from the tokenizer, gradient checkpointing, LoRA
    with task SEQ_CLS (the score head is trained in full and saved with the adapter), train mode."""
    from posttrain.models.lora import apply_lora

    pad = None if tokenizer is None else tokenizer.pad_token_id
    if model is None:
        model = load_reward_model(config.model_name_or_path, **model_load_kwargs(config, config.model_name_or_path),
                                  gradient_checkpointing=config.gradient_checkpointing, pad_token_id=pad)
    else:
        model = as_reward_model(model, pad)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    if config.use_peft and not hasattr(model, "peft_config"):
        model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                           target_modules=config.lora_target_modules,
                           gradient_checkpointing=config.gradient_checkpointing, task_type="SEQ_CLS")
    if getattr(config, "disable_dropout", True):
        from posttrain.models.dropout import disable_dropout

        disable_dropout(model)  # as the policy (models/setup.py): reward recipe and PPO's critic
    if not getattr(config, "low_precision_master_weights", False):
        upcast_trainable_parameters(model, log)  # pitfall 23: fp32 master weights (score head too)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {type(_unwrap_peft(model)).__name__} (score head: 1 output), dtype "
        f"{next(model.parameters()).dtype}, {trainable:,} trainable parameters")
    return model
