"""KL(π_A ‖ π_B) measured on completions sampled from π_A: how far a model moved from a baseline.

For a completion y ~ π_A(· | x) of T tokens, with per-token log-ratio
log r_t = log π_B(y_t | x, y_<t) − log π_A(y_t | x, y_<t), the per-sequence estimates are

    k1(y) = Σ_t −log r_t                 (unbiased for KL(π_A ‖ π_B) over whole sequences)
    k3(y) = Σ_t (r_t − 1) − log r_t      (unbiased too, and >= 0 token by token)

and the reported KL is their mean over the samples (:mod:`posttrain.losses.kl` holds the
per-token estimators). Log-probs are taken at the sampling temperature, so the estimate is of the
KL between the two tempered distributions the samples come from (exact with top_p = 1, top_k = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posttrain.losses.kl import kl_estimate
from posttrain.losses.reductions import masked_sum


def sequence_kl(logps_a: Tensor, logps_b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence k1 and k3 estimates of KL(π_A ‖ π_B) on samples of π_A.

    logps_a, logps_b: (N, T) per-token log-probs of the sampled completion tokens under A and B;
    mask: (N, T) 1 on completion tokens. Returns (k1, k3), each (N,) float: the masked sums over
    t of k1_t = log π_A − log π_B and k3_t = exp(log π_B − log π_A) − 1 − (log π_B − log π_A).
    Both are exactly 0 where the two models give the same log-probs.
    """
    k1 = masked_sum(kl_estimate(logps_a, logps_b, "k1", mask=mask), mask, dim=-1)
    k3 = masked_sum(kl_estimate(logps_a, logps_b, "k3", mask=mask), mask, dim=-1)
    return k1, k3


@torch.no_grad()
def completion_logps(model: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                     pad_token_id: int, temperature: float = 1.0, batch_size: int = 16,
                     chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of each completion given its prompt, under ``model``.

    Rows are prompt + completion ids, right-padded, scored in batches of ``batch_size``.
    Returns (logps, mask), each (N, max completion length) on the CPU: logps[i, t] is
    log π(completion_i[t] | prompt_i, completion_i[:t]) at ``temperature``; mask marks real tokens.
    """
    from posttrain.models.logprobs import LogProbModel

    scorer = LogProbModel(model, chunk_size=chunk_size)
    device = next(model.parameters()).device
    width_out = max(len(c) for c in completion_ids)
    logps = torch.zeros(len(completion_ids), width_out)
    mask = torch.zeros(len(completion_ids), width_out)
    for start in range(0, len(completion_ids), batch_size):
        prompts, completions = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        target = torch.zeros_like(input_ids)
        for r, (p, c) in enumerate(zip(prompts, completions)):
            input_ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            attention[r, :len(p) + len(c)] = 1
            target[r, len(p):len(p) + len(c)] = 1
        out = scorer(input_ids.to(device), attention_mask=attention.to(device),
                     target_mask=target[:, 1:].bool().to(device), temperature=temperature)["logps"].cpu()
        for r, (p, c) in enumerate(zip(prompts, completions)):
            # entry t of the shifted log-probs scores token t + 1: the completion starts at len(p) - 1
            logps[start + r, :len(c)] = out[r, len(p) - 1:len(p) - 1 + len(c)]
            mask[start + r, :len(c)] = 1
    return logps, mask
