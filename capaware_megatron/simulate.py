"""The plans of several expert-parallel ranks, computed in one process (evaluation only).

What a plan keeps decides quality, so quality can be measured at any expert-parallel size
without starting that many processes: each simulated rank plans its own tokens (scopes local and
device need no communication), or the ranks plan together (scope global: the single-process plan
of their gathered batch, ranks in order). Tokens can further be split into steps planned apart,
as a decode engine plans one position of every sequence per step. tests/test_simulate.py holds
the result to the plans of real gloo ranks.

Splitting the tokens reads indices on the host: this is an evaluation tool, not the per-forward
path of a layer.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import CapacityConfig
from .layout import ExpertLayout
from .planner import RoutingPlan, plan_routing


def plan_as_ranks(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    cfg: CapacityConfig,
    rank_of_token: torch.Tensor,
    num_ranks: int,
    step_of_token: Optional[torch.Tensor] = None,
    probs: Optional[torch.Tensor] = None,
    topk: Optional[int] = None,
) -> RoutingPlan:
    """The plan of [T, E] routing as if token t sat on EP rank ``rank_of_token[t]`` (experts
    spread contiguously, E / num_ranks per rank) and were planned in step ``step_of_token[t]``.

    Args:
        scores, routing_map, probs, topk: as for plan_routing, for all T tokens.
        cfg: the capacity configuration (scope local / device: each rank plans alone; global: the
            ranks of one step plan together).
        rank_of_token: [T] int, 0 <= rank < num_ranks. A rank's tokens keep the order they are
            given in (their index on that rank, which priorities position / reverse / random
            read).
        num_ranks: the simulated expert-parallel size; it must divide E.
        step_of_token: [T] int, tokens of different steps are planned apart (None: one step).

    Returns:
        The plans merged: routing_map and probs [T, E] in the input's token order; loads, dropped
        and rerouted counts summed over the plans; capacity the largest plan's.
    """
    num_tokens, num_experts = scores.shape
    if num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(f"num_ranks must divide num_experts={num_experts}, got {num_ranks}")
    rank_of_token = rank_of_token.to(device=scores.device, dtype=torch.int64)
    if rank_of_token.shape != (num_tokens,) or bool(((rank_of_token < 0) | (rank_of_token >= num_ranks)).any()):
        raise ValueError(f"rank_of_token must be [{num_tokens}] ranks in [0, {num_ranks})")
    steps = torch.zeros_like(rank_of_token) if step_of_token is None else step_of_token.to(rank_of_token)
    expert_to_rank = torch.arange(num_experts, device=scores.device) // (num_experts // num_ranks)
    layouts = [ExpertLayout.build(num_experts, expert_to_rank.cpu(), (expert_to_rank == r).cpu())
               for r in range(num_ranks)]
    together = cfg.scope == "global"
    # One plan per (step, rank), or per step for global scope; its tokens in rank order.
    group_of_token = steps * num_ranks + (0 if together else rank_of_token)
    order = torch.argsort(group_of_token * num_ranks + rank_of_token, stable=True)
    new_map = torch.zeros_like(routing_map)
    new_probs = torch.zeros_like(scores if probs is None else probs)
    before = torch.zeros(num_experts, dtype=torch.int64, device=scores.device)
    after, dropped, rerouted, capacity = before.clone(), before.new_zeros(()), before.new_zeros(()), 0
    for group in torch.unique(group_of_token).tolist():
        index = order[group_of_token[order] == group]
        sub_probs = None if probs is None else probs[index]
        if together:
            local = expert_to_rank.unsqueeze(0) == rank_of_token[index].unsqueeze(1)  # [n, E]
            plan = plan_routing(scores[index], routing_map[index], cfg, probs=sub_probs, topk=topk,
                                local_experts=local if cfg.policy == "expanded" else None)
        else:
            plan = plan_routing(scores[index], routing_map[index], cfg, probs=sub_probs, topk=topk,
                                layout=layouts[int(rank_of_token[index[0]])])
        new_map[index], new_probs[index] = plan.routing_map, plan.probs
        before += plan.tokens_per_expert_before
        after += plan.tokens_per_expert_after
        dropped, rerouted = dropped + plan.num_dropped, rerouted + plan.num_rerouted
        capacity = max(capacity, plan.capacity)
    return RoutingPlan(routing_map=new_map, probs=new_probs, capacity=capacity,
                       tokens_per_expert_before=before, tokens_per_expert_after=after,
                       num_dropped=dropped, num_rerouted=rerouted)
