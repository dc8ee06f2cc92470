"""Generation for the online methods: token ids in, token ids (and their log-probs) out.

The contract (docs/rollout.md): a backend takes prompt *ids* and returns, per completion, the ids
exactly as sampled and the sampler's log-prob of each of them. Nothing is decoded and re-encoded
on the way to the loss (pitfall 17); text exists only for reward functions and logs
(:meth:`Rollout.texts`).

:class:`HFGenerationBackend` samples with the very module being trained (a transformers causal LM
and its KV cache), so it never holds stale weights (pitfall 15); stop ids are the generation
config's eos ids (an int or a list) ∪ the tokenizer's eos ∪ ``--stop_token`` (pitfall 16).

Its decode loop is posttrain's own rather than ``model.generate`` because a group shares one
prompt: the prompt is run ONCE and its KV cache repeated for the G completions (``generate``
would prefill every copy), and a completion that has stopped leaves the batch (``generate`` keeps
computing it until the longest one ends). Sampling reuses transformers' logits warpers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError
from posttrain.models.kv_cache import cache_kwargs, output_cache


class GenerationBackendError(PosttrainError):
    """A generation backend cannot be built (unknown name, missing optional extra)."""


# ---------------------------------------------------------------------------- the rollout


@dataclass
class Rollout:
    """Completions of a batch of prompts, as sampled. Row i is one completion.

    prompt_ids[i]      the prompt's ids (unpadded), the same list contents for a whole group
    completion_ids[i]  the sampled ids, unpadded, through the stop token when one was sampled
                       (nothing after it); len >= 1
    sampler_logps[i]   log-prob of each sampled id under the distribution it was sampled from:
                       ``log_softmax(processed logits)`` in fp32, where processing = temperature,
                       then top-k, then top-p (renormalised over the kept tokens). With top_k=0 and
                       top_p=1 this is exactly the trainer's ``log_softmax(logits / temperature)``.
                       Greedy decoding (temperature 0): the untempered ``log_softmax(logits)``.
    truncated[i]       True when no stop id was sampled within max_completion_length
    prompt_index[i]    which input prompt row i answers; groups of ``num_generations``
                       consecutive rows share one prompt ([0, 0, 0, 1, 1, 1, ...])
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logps: list[list[float]]
    truncated: list[bool]
    prompt_index: list[int]
    num_generations: int = 1
    stop_token_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def completion_lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def texts(self, tokenizer, *, skip_special_tokens: bool = True) -> list[str]:
        """The completions as text, for reward functions and logs only (never for the loss).

        The final stop token of a finished completion is left out (it may be an ordinary token
        given with --stop_token, which skip_special_tokens would keep).
        """
        out = []
        for ids, truncated in zip(self.completion_ids, self.truncated):
            if not truncated and ids and ids[-1] in self.stop_token_ids:
                ids = ids[:-1]
            out.append(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
        return out


# ---------------------------------------------------------------------------- the protocol


@runtime_checkable
class GenerationBackend(Protocol):
    """What the online recipes need from a generator."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_completion_length: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
        stop_token_ids: list[int],
        seed: int | list[int] | None,
    ) -> Rollout:
        """``num_generations`` completions per prompt (consecutive). ``stop_token_ids`` are
        added to the backend's own stop ids (the model's eos ids). ``seed``: one seed for the
        call, or one per prompt (:func:`rollout_seeds`: each prompt's own random stream)."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Called after every optimizer step: from now on generate from ``model``'s weights."""
        ...


# ---------------------------------------------------------------------------- helpers


def rollout_seeds(seed: int, step: int, first_position: int, n: int) -> list[int]:
    """One sampling seed per prompt of a step: a function of (run seed, step, the prompt's position
    in the whole step), so resume re-samples exactly, a prompt's completions do not depend on how
    the step is split over processes (1 process x 2B == 2 processes x B, sample for sample), and
    two processes given the same prompt draw different completions (pitfall 27). Process r owns
    positions [r * n, (r + 1) * n) (BatchPlan order)."""
    base = (seed * 100_003 + step) * 1_000_003
    return [base + first_position + i for i in range(n)]


def unwrap_for_generation(model: nn.Module) -> nn.Module:
    """The module whose ``generate`` to call: DDP's ``.module``, torch.compile's ``_orig_mod`` and
    posttrain's LogProbModel are unwrapped; a peft model is kept (its generate runs the adapter)."""
    from posttrain.models.logprobs import LogProbModel

    for _ in range(8):
        if isinstance(model, LogProbModel):
            model = model.model
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); expected a Hugging Face causal LM")
    return model


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def model_eos_token_ids(model: nn.Module) -> list[int]:
    """eos ids from the model's generation_config (an int or a list), else from its config."""
    model = unwrap_for_generation(model)
    gen = getattr(model, "generation_config", None)
    ids = _as_id_list(getattr(gen, "eos_token_id", None))
    if not ids:
        ids = _as_id_list(getattr(getattr(model, "config", None), "eos_token_id", None))
    return ids


def stop_token_ids_from_strings(tokenizer, stop_tokens: list[str | int]) -> list[int]:
    """``--stop_token`` values -> ids. A string must be exactly one token of the vocabulary
    (generation stops on a sampled id, not on text)."""
    ids = []
    for tok in stop_tokens:
        if isinstance(tok, int):
            ids.append(tok)
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is None or tid == tokenizer.unk_token_id and tok != tokenizer.unk_token:
            enc = tokenizer(tok, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(
                    f"stop token {tok!r} is not a single token of the vocabulary (it encodes to "
                    f"{len(enc)} ids {enc}); give a single token or its id"
                )
            tid = enc[0]
        ids.append(int(tid))
    return ids


def resolve_stop_token_ids(model: nn.Module, tokenizer=None, extra: list[int] | tuple = ()) -> list[int]:
    """Stop ids: the generation config's eos ids ∪ the tokenizer's eos ∪ ``extra``, in that order,
    without repeats (pitfall 16)."""
    ids = model_eos_token_ids(model)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    ids += _as_id_list(list(extra))
    return list(dict.fromkeys(ids))


def gathered_for_generation(model: nn.Module):
    """Sharded parameters gathered ONCE for a whole rollout, not per generated token (pitfall 28).

    DeepSpeed ZeRO-3: every parameter is a partition, gathered by hooks around each submodule's
    forward — per token; deepspeed.zero.GatheredParameters gathers them for the rollout instead.
    FSDP2 (``fully_shard``): the sampler calls the causal LM, not the root module's forward, so
    the root's own parameters (embeddings, tied lm_head, final norm) would stay DTensor shards and
    each sharded layer would all-gather and free itself per token; :func:`fsdp2_unsharded` keeps
    every FSDP2 module unsharded for the rollout. ``model`` must then be the FSDP2 root (e.g. the
    prepared LogProbModel). A no-op for unsharded models."""
    from contextlib import nullcontext

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed  # only ZeRO-3 parameters carry ds_id, so deepspeed is installed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    if any(hasattr(p, "full_tensor") for p in model.parameters()):  # DTensor: sharded by FSDP2
        return fsdp2_unsharded(model)
    return nullcontext()


@contextmanager
def fsdp2_unsharded(root: nn.Module):
    """Every FSDP2 module under ``root`` (the root included) all-gathered once, kept whole through
    any number of forwards, then resharded as before: ``unshard()`` each, with reshard-after-forward
    off meanwhile (the documented switch for evaluation), and the settings restored after."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not isinstance(root, FSDPModule):
        raise TypeError(f"{type(root).__name__} has FSDP2-sharded parameters but is not the FSDP2 root: pass the "
                        "prepared (fully_shard-ed) module to the generation backend, not a submodule")
    # The root must be lazily initialised first (its first forward would do it): the sampler's
    # first call runs a layer directly, which would otherwise make that layer the root.
    root._get_fsdp_state()._lazy_init()
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    saved = [(g, g.post_forward_mesh_info) for g in groups]  # what set_reshard_after_forward changes
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield
    finally:
        for g, info in saved:
            g.post_forward_mesh_info = info
        for m in modules:
            m.reshard()


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


# ---------------------------------------------------------------------------- HF backend


class HFGenerationBackend:
    """Sampling with KV cache on the trained module itself: one prefill per prompt, its cache
    repeated for the group, finished completions dropped from the batch.

    model: a HF causal LM, a peft model, or a LogProbModel / DDP wrapper (unwrapped); kept as
        given too, since sharded parameters are gathered from the outermost module (under FSDP2
        the root: pass the prepared module).
    tokenizer: gives the pad id (left padding) and an eos id.
    stop_tokens: ``--stop_token`` values (strings of one token, or ids), stop on them too.
    batch_size: at most this many prompts per ``generate`` call (None: all at once).
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, stop_tokens: list[str | int] = (), batch_size: int | None = None
    ):
        self.root, self.model = model, unwrap_for_generation(model)
        self.tokenizer = tokenizer
        self.extra_stop_ids = stop_token_ids_from_strings(tokenizer, list(stop_tokens))
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def sync_weights(self, model: nn.Module) -> None:
        """A no-op in effect: the backend generates with the trained module itself, so an optimizer
        step is seen at once. Re-points at ``model`` (unwrapped) in case a wrapper was passed."""
        self.root, self.model = model, unwrap_for_generation(model)

    def stop_token_ids(self, extra: list[int] = ()) -> list[int]:
        return resolve_stop_token_ids(self.model, self.tokenizer, list(self.extra_stop_ids) + list(extra))

    def _pad_id(self, stop_ids: list[int]) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = stop_ids[0] if stop_ids else 0
        return int(pad)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int = 1,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        stop_token_ids: list[int] = (),
        seed: int | list[int] | None = None,
    ) -> Rollout:
        _check_args(prompt_ids, num_generations, max_completion_length, temperature, top_p, top_k)
        per_prompt = isinstance(seed, (list, tuple))
        if per_prompt and len(seed) != len(prompt_ids):
            raise ValueError(f"{len(seed)} seeds for {len(prompt_ids)} prompts")
        stop_ids = self.stop_token_ids(list(stop_token_ids))
        if not stop_ids:
            raise ValueError(
                "no stop token: the model's generation_config and the tokenizer have no eos id; "
                "pass --stop_token"
            )
        modes = _module_modes(self.model)
        self.model.eval()  # no dropout while sampling; the train/eval state is restored below
        device = _device_of(self.model)
        try:
            with (gathered_for_generation(self.root), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
                  torch.inference_mode()):
                if seed is not None and not per_prompt:
                    torch.manual_seed(seed)
                step = self.batch_size or len(prompt_ids)
                parts = [
                    self._generate_batch(
                        prompt_ids[s : s + step],
                        s,
                        num_generations,
                        max_completion_length,
                        temperature,
                        top_p,
                        top_k,
                        stop_ids,
                        device,
                        seed[s : s + step] if per_prompt else None,
                    )
                    for s in range(0, len(prompt_ids), step)
                ]
        finally:
            for m, mode in modes:
                m.training = mode
        return Rollout(
            prompt_ids=[p for part in parts for p in part.prompt_ids],
            completion_ids=[c for part in parts for c in part.completion_ids],
            sampler_logps=[lp for part in parts for lp in part.sampler_logps],
            truncated=[t for part in parts for t in part.truncated],
            prompt_index=[i for part in parts for i in part.prompt_index],
            num_generations=num_generations,
            stop_token_ids=stop_ids,
        )

    def _generate_batch(
        self, prompts, offset, num_generations, max_new, temperature, top_p, top_k, stop_ids, device, seeds=None
    ) -> Rollout:
        pad = self._pad_id(stop_ids)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # LEFT padding: every prompt ends where generation starts
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift positions

        # One prefill per prompt; its cache and last logits are repeated for the group's G rows.
        out = self._forward(input_ids, attention_mask, position_ids, cache=None, last_only=True)
        cache = output_cache(out)
        if cache is None:
            raise TypeError(f"{type(self.model).__name__} returned no KV cache; the hf backend needs use_cache support")
        logits = out.logits[:, -1, :]
        if num_generations > 1:
            cache.batch_repeat_interleave(num_generations)
            logits = logits.repeat_interleave(num_generations, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_generations, dim=0)
            position_ids = position_ids.repeat_interleave(num_generations, dim=0)
        next_position = position_ids[:, -1:] + 1

        warpers = _sampling_warpers(temperature, top_k, top_p)
        stop = torch.tensor(stop_ids, device=device)
        rows = logits.shape[0]
        tokens = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
        score_dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        logps = torch.zeros((rows, max_new), dtype=score_dtype, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # which original row each batch row is
        # per-prompt seeds: prompt k's G rows draw from their own stream (pitfall 27)
        streams = None if seeds is None else [torch.Generator(device).manual_seed(int(x)) for x in seeds]
        for t in range(max_new):
            scores = logits.to(score_dtype)
            for warp in warpers:
                scores = warp(None, scores)  # transformers' warpers ignore input_ids
            # the sampler's own distribution, recorded for every sampled token (Rollout.sampler_logps)
            step_logps = torch.log_softmax(scores, dim=-1)
            if temperature > 0:
                # exponential race (argmax p / E, E ~ Exp(1)) == a draw from p; the noise is drawn for
                # every original row, so a row's sample does not depend on which others have stopped.
                # -log U is Exp(1) and ~6x cheaper on CPU than Tensor.exponential_ (not vectorised).
                if streams is None:
                    uniform = torch.rand((rows, scores.shape[-1]), device=device)
                else:
                    uniform = torch.cat([torch.rand((num_generations, scores.shape[-1]), generator=g, device=device)
                                         for g in streams])
                noise = uniform.log_().neg_()[live]
                sampled = (step_logps.exp() / noise).argmax(dim=-1)
            else:
                sampled = scores.argmax(dim=-1)
            tokens[live, t] = sampled
            logps[live, t] = step_logps.gather(1, sampled[:, None]).squeeze(1)
            lengths[live] = t + 1
            done = torch.isin(sampled, stop)
            finished[live] = done
            if t == max_new - 1 or bool(done.all()):
                break
            if bool(done.any()):  # a finished completion leaves the batch (and the cache)
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, sampled = live[keep], sampled[keep]
                attention_mask, next_position = attention_mask[keep], next_position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            out = self._forward(sampled[:, None], attention_mask, next_position, cache=cache, last_only=False)
            cache, logits = output_cache(out), out.logits[:, -1, :]
            next_position = next_position + 1

        tokens, logps, lengths, finished = tokens.tolist(), logps.cpu().tolist(), lengths.tolist(), finished.tolist()
        rollout = Rollout([], [], [], [], [], num_generations, stop_ids)
        for row in range(rows):
            k = row // num_generations
            rollout.prompt_ids.append(list(prompts[k]))
            rollout.completion_ids.append(tokens[row][: lengths[row]])
            rollout.sampler_logps.append(logps[row][: lengths[row]])
            rollout.truncated.append(not finished[row])
            rollout.prompt_index.append(offset + k)
        return rollout

    def _forward(self, input_ids, attention_mask, position_ids, *, cache, last_only: bool):
        kwargs = {"logits_to_keep": 1} if last_only and self._takes_logits_to_keep() else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **cache_kwargs(self.model, cache), **kwargs)

    def _takes_logits_to_keep(self) -> bool:
        """transformers' causal LMs can skip the vocabulary projection of all but the last prompt
        position; a peft wrapper passes the keyword through to its base model."""
        import inspect

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(base.forward).parameters


def _sampling_warpers(temperature: float, top_k: int | None, top_p: float) -> list:
    """transformers' logits warpers in the order vLLM and HF apply them: temperature, top-k, top-p.
    Greedy (temperature 0): none, so the recorded log-probs are the untempered distribution."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if temperature <= 0:
        return []
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(top_p)))
    return warpers


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_args(prompt_ids, num_generations, max_completion_length, temperature, top_p, top_k) -> None:
    if not prompt_ids:
        raise ValueError("no prompts to generate from")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")


# ---------------------------------------------------------------------------- factory

BACKENDS = ("hf", "vllm")


def make_backend(name: str, model: nn.Module, tokenizer, **kwargs: Any) -> GenerationBackend:
    """``"hf"`` (alias ``"transformers"``): :class:`HFGenerationBackend`. ``"vllm"``: needs the
    ``[vllm]`` extra and a GPU; see docs/rollout.md for how a vLLM backend plugs in."""
    key = name.lower()
    if key in ("hf", "transformers"):
        return HFGenerationBackend(model, tokenizer, **kwargs)
    if key == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise GenerationBackendError(
                "generation backend 'vllm' needs vLLM, which is not installed: "
                "pip install 'posttrain[vllm]' (GPU only), or use backend='hf'"
            ) from None
        raise GenerationBackendError(
            "generation backend 'vllm' is not part of this posttrain version yet (vLLM is installed, but "
            "no backend wraps it); use backend='hf' — docs/rollout.md describes the interface it will implement"
        )
    raise GenerationBackendError(
        f"unknown generation backend {name!r}; expected one of: {', '.join(BACKENDS)}"
    )
