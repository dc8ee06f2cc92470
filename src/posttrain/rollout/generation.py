"""Generation for the online methods: token ids in, token ids (and their log-probs) out.

The contract (docs/rollout.md): a backend takes prompt *ids* and returns, per completion, the ids
exactly as sampled and the sampler's log-prob of each of them. Nothing is decoded and re-encoded
on the way to the loss (pitfall 17); text exists only for reward functions and logs
(:meth:`Rollout.texts`).

:class:`HFGenerationBackend` runs ``model.generate`` (KV cache) on the very module being trained,
so it never holds stale weights (pitfall 15); stop ids are the generation config's eos ids (an int
or a list) ∪ the tokenizer's eos ∪ ``--stop_token`` (pitfall 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError


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
        seed: int | None,
    ) -> Rollout:
        """``num_generations`` completions per prompt (consecutive). ``stop_token_ids`` are
        added to the backend's own stop ids (the model's eos ids)."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Called after every optimizer step: from now on generate from ``model``'s weights."""
        ...


# ---------------------------------------------------------------------------- helpers


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


class _SamplerLogProbs:
    """A logits processor, placed LAST, that records the log-prob of each sampled token under the
    processed (sampling) distribution without keeping the per-step scores: at step t it sees the
    token sampled at step t-1 (the last column of input_ids) and gathers it from step t-1's
    log-softmax, which is the only (B, V) block held."""

    def __init__(self):
        self.calls = 0
        self.last: Tensor | None = None
        self.gathered: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.last is not None:
            self.gathered.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last = torch.log_softmax(scores.float(), dim=-1)
        self.calls += 1
        return scores

    def logps(self, new_tokens: Tensor) -> Tensor:
        """(B, n) log-probs of the n generated columns ``new_tokens``."""
        n = new_tokens.shape[1]
        cols = list(self.gathered[:n])
        if len(cols) < n:  # the final step's token: sampled after the last call
            cols.append(self.last.gather(1, new_tokens[:, len(cols) : len(cols) + 1]).squeeze(1))
        if len(cols) != n:
            raise RuntimeError(f"recorded {len(cols)} sampler log-probs for {n} generated tokens")
        return torch.stack(cols, dim=1) if cols else new_tokens.new_zeros(new_tokens.shape[0], 0).float()


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


# ---------------------------------------------------------------------------- HF backend


class HFGenerationBackend:
    """``model.generate`` (KV cache) on the trained module itself.

    model: a HF causal LM, a peft model, or a LogProbModel / DDP wrapper (unwrapped).
    tokenizer: gives the pad id (left padding) and an eos id.
    stop_tokens: ``--stop_token`` values (strings of one token, or ids), stop on them too.
    batch_size: at most this many prompts per ``generate`` call (None: all at once).
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, stop_tokens: list[str | int] = (), batch_size: int | None = None
    ):
        self.model = unwrap_for_generation(model)
        self.tokenizer = tokenizer
        self.extra_stop_ids = stop_token_ids_from_strings(tokenizer, list(stop_tokens))
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def sync_weights(self, model: nn.Module) -> None:
        """A no-op in effect: the backend generates with the trained module itself, so an optimizer
        step is seen at once. Re-points at ``model`` (unwrapped) in case a wrapper was passed."""
        self.model = unwrap_for_generation(model)

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
        seed: int | None = None,
    ) -> Rollout:
        _check_args(prompt_ids, num_generations, max_completion_length, temperature, top_p, top_k)
        stop_ids = self.stop_token_ids(list(stop_token_ids))
        if not stop_ids:
            raise ValueError(
                "no stop token: the model's generation_config and the tokenizer have no eos id; "
                "pass --stop_token"
            )
        modes = _module_modes(self.model)
        self.model.eval()
        device = _device_of(self.model)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
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
        self, prompts, offset, num_generations, max_new, temperature, top_p, top_k, stop_ids, device
    ) -> Rollout:
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        pad = self._pad_id(stop_ids)
        width = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(num_generations)]  # a prompt's group is consecutive
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):  # LEFT padding: every prompt ends where generation starts
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1

        do_sample = temperature > 0
        # Sampling is done by our own warpers, in the order vLLM and HF use (temperature, top-k,
        # top-p), followed by the recorder: HF appends its own warpers AFTER custom processors, so
        # they are switched off in the config and ours are passed as the (last) custom processors.
        processors = LogitsProcessorList()
        if do_sample and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if do_sample and top_k:
            processors.append(TopKLogitsWarper(top_k=int(top_k)))
        if do_sample and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(top_p)))
        recorder = _SamplerLogProbs()
        processors.append(recorder)
        # Sampling knobs the model's generation_config may carry (SmolLM2's says temperature 0.2,
        # top_p 0.9) are set explicitly so that only this call's arguments shape the distribution.
        config = GenerationConfig(
            do_sample=do_sample,
            num_beams=1,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            # None would be filled from the model's config: 0.0 makes HF's min-p warper a no-op
            min_p=0.0 if getattr(self.model.generation_config, "min_p", None) is not None else None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_length=0,
            max_new_tokens=max_new,
            num_return_sequences=1,
            eos_token_id=stop_ids,
            pad_token_id=pad,
            use_cache=True,
            return_dict_in_generate=True,
        )
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=processors,
        )
        sequences = out.sequences if hasattr(out, "sequences") else out
        new_tokens = sequences[:, width:]
        logps = recorder.logps(new_tokens)
        new_tokens, logps = new_tokens.tolist(), logps.cpu().tolist()

        stop = set(stop_ids)
        rollout = Rollout([], [], [], [], [], num_generations, stop_ids)
        for row, (ids, lps) in enumerate(zip(new_tokens, logps)):
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stop), None)
            truncated = end is None
            end = len(ids) if truncated else end
            k = row // num_generations
            rollout.prompt_ids.append(list(prompts[k]))
            rollout.completion_ids.append(ids[:end])
            rollout.sampler_logps.append(lps[:end])
            rollout.truncated.append(truncated)
            rollout.prompt_index.append(offset + k)
        return rollout


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
