"""Synthetic router outputs with the skew of trained MoE models (demo, benchmarks, tests)."""

from __future__ import annotations

import torch


def skewed_routing(
    num_tokens: int,
    num_experts: int,
    topk: int,
    *,
    skew: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [T, E] softmax probabilities, routing_map [T, E] top-k) with Zipf-like hot experts.

    skew scales a per-expert logit bias log(1 / rank), so expert 0 is the hottest.
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    bias = -torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    perm = torch.randperm(num_experts, generator=gen)
    scores = (logits + skew * bias[perm]).softmax(-1).to(dtype)
    top = torch.topk(scores.float(), topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, top, True)
    return scores, routing_map
