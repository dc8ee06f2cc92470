"""Per-token log-probs (and entropy, argmax accuracy) without materialising full logits.

A causal LM's log-prob of its next token is ``log_softmax(h @ W.T / tau)[y]``. Computing the
(B, T, V) logits in fp32 costs B*T*V*4 bytes (8 GiB for 16k tokens of a 128k vocabulary) and
autograd would keep them for backward. Here the logits live one chunk of rows at a time, in
the forward and again (recomputed) in the backward; only the log-sum-exp (one float per token)
is kept. The log-softmax is always computed in fp32 (pitfall 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from posttrain.models.kv_cache import cache_kwargs, output_cache

# Attention backends whose transformers integration turns position_ids that restart at 0 into
# per-example attention when attention_mask is None (masking_utils.find_packed_sequence_indices
# for sdpa/eager/flex; position_ids -> cu_seqlens for flash attention).
PACKING_ATTN_IMPLEMENTATIONS = frozenset(
    {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 -> fp32; fp64 stays fp64 so gradcheck can run in double precision
    return torch.promote_types(dtype, torch.float32)


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """logp_i = (h_i . w_{y_i}) / tau - logsumexp_v (h_i . w_v / tau), chunked over rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, with_entropy, with_accuracy):
        n = hidden.shape[0]
        cdtype = _compute_dtype(hidden.dtype)
        valid = targets >= 0  # negative targets (e.g. -100) are ignored: logp 0, no gradient
        safe_t = targets.clamp(min=0)
        logp = torch.zeros(n, dtype=cdtype, device=hidden.device)
        lse = torch.zeros(n, dtype=cdtype, device=hidden.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=cdtype, device=hidden.device)
        correct = torch.zeros(n if with_accuracy else 0, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = (hidden[s:e] @ weight.T).to(cdtype)  # fresh tensor: safe to edit in place
            if temperature != 1.0:
                logits.div_(temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[s:e] = chunk_lse
            logp[s:e] = logits.gather(1, safe_t[s:e, None]).squeeze(1) - chunk_lse
            if with_accuracy:
                correct[s:e] = logits.argmax(-1) == safe_t[s:e]
            if with_entropy:
                # H = -sum_v p_v log p_v on the shifted log-probs (lse - sum p z cancels badly
                # when H is small); in place, the logits are not needed any more
                logps = logits.sub_(chunk_lse[:, None])
                entropy[s:e] = (-(logps.exp() * logps).sum(-1)).clamp(min=0)  # H >= 0 (rounding)
            del logits
        logp = torch.where(valid, logp, torch.zeros((), dtype=cdtype, device=logp.device))
        if with_accuracy:
            correct &= valid
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.device_type = hidden.device.type
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy, correct)
        return logp, entropy, correct

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy, _grad_correct):
        with torch.autocast(ctx.device_type, enabled=False):
            return _ChunkedTokenLogProbs._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = grad_weight = None
        if grad_logp is None or not (need_h or need_w):
            return None, None, None, None, None, None, None
        n = hidden.shape[0]
        cdtype = lse.dtype
        tau = ctx.temperature
        valid = targets >= 0
        safe_t = targets.clamp(min=0)
        # g_i / tau, zero for ignored targets
        g = torch.where(valid, grad_logp.to(cdtype), torch.zeros((), dtype=cdtype, device=lse.device)) / tau
        neg_g = -g  # x * (-g) == -(x * g) exactly: one pass over each (chunk, V) block fewer than neg_ + mul_
        low_precision = weight.dtype != cdtype
        # CPU, bf16/fp16: torch's gemm without native bf16 (no AMX/AVX512-BF16) is ~20x slower for
        # a (c, V) @ (V, H) product than for the same product written a @ b.T with both operands
        # row-major (measured: 10.2 s vs 0.55 s for c=128, V=49152, H=576). So the backward's two
        # products take that layout, at the cost of transposed copies (W once, each chunk's
        # gradient block); same inputs and dtypes, only the order of the fp32 sums may differ.
        nt_layout = low_precision and weight.device.type == "cpu"
        weight_t = weight.T.contiguous() if nt_layout and need_h else None  # (H, V)
        if need_h:
            grad_hidden = torch.empty_like(hidden)
        if need_w:
            # accumulated in fp32 across chunks: summing many bf16 partial products loses bits
            grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e]
            # d logp_i / d z_iv = (onehot - softmax) / tau, times upstream g_i; built in place
            # in the recomputed logits so one (chunk, V) block is live
            grad_logits = (h @ weight.T).to(cdtype)
            if tau != 1.0:
                grad_logits.div_(tau)
            grad_logits.sub_(lse[s:e, None]).exp_()
            grad_logits.mul_(neg_g[s:e, None])
            grad_logits.scatter_add_(1, safe_t[s:e, None], g[s:e, None])
            if low_precision:
                # bf16/fp16 matmuls (tensor cores), fp32 accumulation across chunks
                gl = grad_logits.to(weight.dtype)
                if need_h:
                    grad_hidden[s:e] = gl @ weight_t.T if nt_layout else gl @ weight
                if need_w:
                    grad_weight.add_(gl.T.contiguous() @ h.T.contiguous().T if nt_layout else gl.T @ h)
            else:
                if need_h:
                    grad_hidden[s:e] = (grad_logits @ weight).to(hidden.dtype)
                if need_w:
                    grad_weight.addmm_(grad_logits.T, h)
            del grad_logits
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def token_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_accuracy: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-probs of ``targets`` under ``softmax(hidden @ weight.T / temperature)``, chunked.

    ``logp_i = z_{i,y_i} - log sum_v exp(z_iv)`` with ``z_i = h_i W^T / tau`` (in fp32).

    hidden: (N, H), any float dtype; weight: (V, H) the unembedding (lm_head) matrix;
    targets: (N,) long; a negative target (-100) gives logp 0 and no gradient.
    Returns ``(logp (N,) fp32 differentiable w.r.t. hidden and weight,
    entropy (N,) fp32 no-grad or None, argmax == target (N,) bool or None)``.
    Peak extra memory: one (chunk_size, V) fp32 block (two in backward); only N floats are saved
    for backward. Backward recomputes each chunk's logits (one extra matmul).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden (N,H), weight (V,H), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # do the matmul in the autocast dtype (as the model's own lm_head would), but explicitly,
        # so the backward's recompute uses exactly the forward's dtypes
        amp_dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    with torch.autocast(device_type, enabled=False):
        logp, entropy, correct = _ChunkedTokenLogProbs.apply(
            hidden, weight, targets.long(), int(chunk_size), float(temperature), with_entropy, with_accuracy
        )
    if logp.dtype != torch.float64:
        logp = logp.float()
    return logp, (entropy if with_entropy else None), (correct if with_accuracy else None)


def full_weight(weight: Tensor) -> Tensor:
    """The whole matrix of a parameter that may be sharded. Under FSDP2, outside the forward of the
    module that owns it, a parameter is a DTensor shard (e.g. a tied lm_head after the backbone's
    forward resharded it); ``full_tensor()`` all-gathers it, and its backward reduce-scatters the
    gradient back onto the shard (pitfall 28). Plain tensors pass through."""
    full = getattr(weight, "full_tensor", None)
    return full() if callable(full) else weight


def _head_logprobs(head: nn.Module, scale: float, softcap: float | None, temperature: float, wants: tuple):
    """Fallback per-chunk function for heads we cannot fuse (bias, LoRA-wrapped, softcapping)."""
    with_entropy, with_accuracy = wants

    def fn(h: Tensor, t: Tensor):
        z = head(h)
        z = z.to(_compute_dtype(z.dtype))  # fp32 (fp64 stays fp64)
        if scale != 1.0:
            z = z * scale
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        if temperature != 1.0:
            z = z / temperature
        logps = torch.log_softmax(z, dim=-1)
        lp = logps.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        lp = torch.where(t >= 0, lp, torch.zeros_like(lp))
        with torch.no_grad():
            ent = (-(logps.exp() * logps).sum(-1)).clamp(min=0) if with_entropy else None  # H >= 0 (rounding)
            cor = (z.argmax(-1) == t) if with_accuracy else None
        return lp, ent, cor

    return fn


@dataclass
class SharedPrefix:
    """Prompts shared by several rows (a GRPO group: G completions of one prompt).

    input_ids, attention_mask (P, S): the P distinct prompts, LEFT-padded (each ends at column S-1).
    index (B,): which prompt each of the B scored rows continues.

    Given to :meth:`LogProbModel.forward`, each prompt is run once and its keys/values are reused
    by all its rows, instead of being recomputed for every row.
    """

    input_ids: Tensor
    attention_mask: Tensor
    index: Tensor


def _unwrap_peft(model: nn.Module) -> nn.Module:
    # LoRA layers are injected in place, so the base model's own modules already carry them
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class LogProbModel(nn.Module):
    """Wraps a HF causal LM (or peft model) so the training loop (and accelerate/DDP, which must
    see the forward) gets per-token log-probs without full logits.

    ``self.model`` is the wrapped model; :func:`posttrain.models.saving.save_pretrained_model`
    unwraps to it.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def _no_split_modules(self):
        # accelerate's FSDP auto-wrap reads the prepared module's layer classes (the decoder layers)
        return getattr(_unwrap_peft(self.model), "_no_split_modules", None)

    # The parts are looked up on every call (cheap) so peft's disable_adapter(), merges and
    # accelerate's device placement are always seen as they are now.
    def _parts(self) -> tuple[nn.Module, nn.Module, Any]:
        causal_lm = _unwrap_peft(self.model)
        prefix = getattr(causal_lm, "base_model_prefix", "model")
        backbone = getattr(causal_lm, prefix, None)
        if backbone is None:
            raise ValueError(f"{type(causal_lm).__name__} has no backbone attribute {prefix!r}")
        head = causal_lm.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(causal_lm).__name__} has no output embeddings (lm_head)")
        return backbone, head, causal_lm.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        target_mask: Tensor | None = None,
        with_entropy: bool = False,
        with_accuracy: bool = False,
        temperature: float = 1.0,
        return_hidden: bool = False,
        prefix: SharedPrefix | None = None,
    ) -> dict[str, Tensor | None]:
        """Log-prob of each next token.

        input_ids (B, T); attention_mask (B, T) 1 = real token (left or right padding), or None
        for padding-free packed rows (B = 1) whose position_ids restart at 0 per example.
        Returns ``{"logps": (B, T-1) fp32, "entropy": (B, T-1) fp32 | None,
        "correct": (B, T-1) bool | None}``: entry t scores token t+1 given tokens <= t. Positions
        whose input or target is padding are 0 / False — mask them (labels come from explicit
        masks, never from these zeros).

        target_mask (B, T-1), optional: only these positions are scored (others come back 0), so
        prompt tokens that carry no loss cost no vocabulary matmul either.

        return_hidden: also return ``"hidden"``, the backbone's final hidden states (B, T, H), e.g.
        for a value head that shares the policy's backbone (PPO).

        prefix (:class:`SharedPrefix`): the rows are continuations of shared prompts. Then
        input_ids / attention_mask (B, T) are the continuations alone (right-padded) and EVERY
        token is scored: entry t of the (B, T) results scores input_ids[:, t] given the row's
        prompt and input_ids[:, :t]; target_mask is (B, T). Same numbers as scoring prompt +
        continuation rows (to fp32 rounding), with each prompt's forward done once.
        """
        backbone, head, config = self._parts()
        if prefix is not None:
            if return_hidden or position_ids is not None or attention_mask is None:
                raise ValueError("prefix= needs an attention_mask and takes no position_ids or return_hidden")
            hidden, targets = self._hidden_after_prefix(backbone, input_ids, attention_mask, prefix), input_ids
            keep = attention_mask.bool()
        else:
            # use_cache=False: with a KV cache transformers skips packed-sequence detection
            out = backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                return_dict=True,
            )
            hidden = out.last_hidden_state[:, :-1]
            targets = input_ids[:, 1:]
            if attention_mask is not None:
                keep = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
            else:
                keep = torch.ones_like(targets, dtype=torch.bool)
        b, t1 = targets.shape
        if target_mask is not None:
            keep = keep & target_mask.bool()
        # only real positions go through the head: padding costs no vocabulary matmul
        idx = keep.reshape(-1).nonzero().squeeze(1)
        h = hidden.reshape(b * t1, -1).index_select(0, idx)
        y = targets.reshape(-1).index_select(0, idx)

        scale = float(getattr(config, "logit_scale", None) or 1.0)
        softcap = getattr(config, "final_logit_softcapping", None)
        fusable = type(head) is nn.Linear and head.bias is None and scale == 1.0 and not softcap
        if fusable:
            lp, ent, cor = token_logprobs_from_hidden(
                h,
                full_weight(head.weight),
                y,
                chunk_size=self.chunk_size,
                temperature=temperature,
                with_entropy=with_entropy,
                with_accuracy=with_accuracy,
            )
        else:
            lp, ent, cor = self._fallback(
                h, y, head, scale, softcap, temperature, with_entropy, with_accuracy
            )

        def scatter(values: Tensor | None, fill_dtype: torch.dtype) -> Tensor | None:
            if values is None:
                return None
            full = torch.zeros(b * t1, dtype=fill_dtype, device=values.device)
            return full.index_copy(0, idx, values.to(fill_dtype)).view(b, t1)

        result = {
            # fp32 (fp64 stays fp64, so exactness tests can run in double precision)
            "logps": scatter(lp, _compute_dtype(lp.dtype)),
            "entropy": scatter(ent, _compute_dtype(lp.dtype)),
            "correct": scatter(cor, torch.bool),
        }
        if return_hidden:
            result["hidden"] = out.last_hidden_state
        return result

    def _hidden_after_prefix(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                             prefix: SharedPrefix) -> Tensor:
        """(B, T, H): entry t is the final hidden state that predicts input_ids[:, t]."""
        p_mask = prefix.attention_mask
        p_positions = (p_mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        row_mask = torch.cat([p_mask.index_select(0, prefix.index), attention_mask], dim=1)
        if getattr(backbone, "gradient_checkpointing", False) and backbone.training:
            # checkpointed layers run without a KV cache: score [prompt | continuation] rows instead
            full_ids = torch.cat([prefix.input_ids.index_select(0, prefix.index), input_ids], dim=1)
            positions = (row_mask.cumsum(-1) - 1).clamp(min=0)
            out = backbone(input_ids=full_ids, attention_mask=row_mask, position_ids=positions, use_cache=False,
                           return_dict=True)
            s = prefix.input_ids.shape[1]
            return out.last_hidden_state[:, s - 1 : s - 1 + input_ids.shape[1]]
        first = backbone(input_ids=prefix.input_ids, attention_mask=p_mask, position_ids=p_positions, use_cache=True,
                         return_dict=True)
        cache = output_cache(first)
        cache.batch_select_indices(prefix.index)  # each row gets its prompt's keys/values (differentiable)
        positions = p_mask.sum(-1).index_select(0, prefix.index)[:, None] + torch.arange(
            input_ids.shape[1], device=input_ids.device)
        rest = backbone(input_ids=input_ids, attention_mask=row_mask, position_ids=positions, use_cache=True,
                        return_dict=True, **cache_kwargs(backbone, cache))
        last_prompt = first.last_hidden_state[:, -1:].index_select(0, prefix.index)
        return torch.cat([last_prompt, rest.last_hidden_state[:, :-1]], dim=1)

    def _fallback(self, h, y, head, scale, softcap, temperature, with_entropy, with_accuracy):
        fn = _head_logprobs(head, scale, softcap, temperature, (with_entropy, with_accuracy))
        lps, ents, cors = [], [], []
        for s in range(0, h.shape[0], self.chunk_size):
            hc, yc = h[s : s + self.chunk_size], y[s : s + self.chunk_size]
            if torch.is_grad_enabled() and (
                hc.requires_grad or any(p.requires_grad for p in head.parameters())
            ):
                # recomputed in backward, so only this chunk's logits ever exist at once
                lp, ent, cor = checkpoint(fn, hc, yc, use_reentrant=False)
            else:
                lp, ent, cor = fn(hc, yc)
            lps.append(lp)
            ents.append(ent)
            cors.append(cor)
        if not lps:
            empty = h.new_zeros(0, dtype=torch.float32)
            return (
                empty,
                (empty if with_entropy else None),
                (y.new_zeros(0, dtype=torch.bool) if with_accuracy else None),
            )
        return (
            torch.cat(lps).to(_compute_dtype(h.dtype)),
            torch.cat(ents) if with_entropy else None,
            torch.cat(cors) if with_accuracy else None,
        )


def check_packing_support(model: nn.Module) -> None:
    """Raise ValueError unless ``model`` keeps packed examples (position_ids restarting at 0,
    attention_mask None) from attending to each other (pitfall 6).

    Accepts the attention backends in ``PACKING_ATTN_IMPLEMENTATIONS`` when the installed
    transformers detects packed sequences from position_ids.
    """
    if isinstance(model, LogProbModel):
        model = model.model
    model = _unwrap_peft(model)
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise ValueError(
            "padding-free packing needs a transformers version whose masking_utils detects packed "
            "sequences from position_ids (>= 4.56); upgrade transformers or set packing=false"
        ) from None
    # hub kernels (e.g. "kernels-community/flash-attn3") go through the same flash-attention
    # path, which turns position_ids into cu_seqlens
    is_flash = isinstance(impl, str) and ("flash_attn" in impl or "flash-attn" in impl)
    if impl not in PACKING_ATTN_IMPLEMENTATIONS and not is_flash:
        raise ValueError(
            f"attention implementation {impl!r} cannot honour packed position_ids, so packed examples "
            f"would attend to each other; use one of {sorted(PACKING_ATTN_IMPLEMENTATIONS)} "
            "(attn_implementation=...) or set packing=false"
        )
