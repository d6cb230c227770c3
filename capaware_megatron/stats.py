"""Load statistics of a routing plan: what the straggler effect is and what the plan does to it.

Everything stays on the tensors' device (no host sync), so a monitor can accumulate it per layer
per step and reduce once per logging step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .planner import RoutingPlan


@dataclass
class LoadStats:
    """Per-layer load figures; every field a 0-dim fp32 tensor except the [E] / [R] loads.

    straggler = max / mean load (1.0 is perfect balance); speedup = max load before / after, the
    layer's projected speedup when its time is that of its busiest expert (or EP rank).
    """

    tokens_per_expert_before: torch.Tensor
    tokens_per_expert_after: torch.Tensor
    tokens_per_rank_before: torch.Tensor
    tokens_per_rank_after: torch.Tensor
    straggler_expert_before: torch.Tensor
    straggler_expert_after: torch.Tensor
    straggler_rank_before: torch.Tensor
    straggler_rank_after: torch.Tensor
    cv_before: torch.Tensor
    cv_after: torch.Tensor
    dropped_fraction: torch.Tensor
    rerouted_fraction: torch.Tensor
    capacity: float
    speedup_expert: torch.Tensor
    speedup_rank: torch.Tensor


def straggler_factor(load: torch.Tensor) -> torch.Tensor:
    """max / mean of a load vector (1.0 for an empty one)."""
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, load.max() / mean.clamp_min(1e-12), torch.ones_like(mean))


def coefficient_of_variation(load: torch.Tensor) -> torch.Tensor:
    """std / mean of a load vector (population std; 0.0 for an empty one)."""
    load = load.float()
    mean = load.mean()
    std = load.std(unbiased=False)
    return torch.where(mean > 0, std / mean.clamp_min(1e-12), torch.zeros_like(mean))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.float(), den.float()
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.ones_like(den))


def per_rank(load: torch.Tensor, expert_to_rank: torch.Tensor) -> torch.Tensor:
    """[E] -> [R]: load summed over the experts each EP rank hosts."""
    num_ranks = int(expert_to_rank.max()) + 1 if expert_to_rank.numel() else 0
    out = torch.zeros(num_ranks, dtype=load.dtype, device=load.device)
    return out.index_add_(0, expert_to_rank.to(load.device), load)


def load_stats(
    before: torch.Tensor,
    after: torch.Tensor,
    num_dropped: torch.Tensor,
    num_rerouted: torch.Tensor,
    capacity: float,
    expert_to_rank: Optional[torch.Tensor] = None,
) -> LoadStats:
    """Statistics from per-expert loads (already reduced over whatever group the caller wants).

    Args:
        before, after: [E] assignments per expert in the router's map and in the plan.
        num_dropped, num_rerouted: counts over the same tokens.
        capacity: the plan's capacity (for the record).
        expert_to_rank: [E] EP rank of each expert; None puts each expert on its own rank.
    """
    if expert_to_rank is None:
        expert_to_rank = torch.arange(before.numel(), device=before.device)
    rank_before, rank_after = per_rank(before, expert_to_rank), per_rank(after, expert_to_rank)
    total = before.sum().float()
    return LoadStats(
        tokens_per_expert_before=before,
        tokens_per_expert_after=after,
        tokens_per_rank_before=rank_before,
        tokens_per_rank_after=rank_after,
        straggler_expert_before=straggler_factor(before),
        straggler_expert_after=straggler_factor(after),
        straggler_rank_before=straggler_factor(rank_before),
        straggler_rank_after=straggler_factor(rank_after),
        cv_before=coefficient_of_variation(before),
        cv_after=coefficient_of_variation(after),
        dropped_fraction=_ratio(num_dropped, total) * (total > 0),
        rerouted_fraction=_ratio(num_rerouted, total) * (total > 0),
        capacity=capacity,
        speedup_expert=_ratio(before.max(), after.max()),
        speedup_rank=_ratio(rank_before.max(), rank_after.max()),
    )


def plan_stats(plan: RoutingPlan, expert_to_rank: Optional[torch.Tensor] = None) -> LoadStats:
    """load_stats of one plan, on this rank's tokens."""
    return load_stats(
        plan.tokens_per_expert_before,
        plan.tokens_per_expert_after,
        plan.num_dropped,
        plan.num_rerouted,
        plan.capacity,
        expert_to_rank,
    )
