"""Token Reroute in a bounded number of rounds, each a fixed sequence of device ops.

A round: every pending overflow assignment proposes its token's next-best expert (by score; ties:
lower index) that the token does not use and whose bin had room at the round's start (a token's
j-th pending assignment, by priority key, takes its j-th such expert); each bin accepts the
proposals with the largest keys up to its remaining room (a threshold, as drop does); the rest
stay pending for the next round. The cap is never exceeded, the originals kept are drop's, and
shapes depend only on (T, E, C): no host synchronization, so a CUDA graph can hold it.

The exact serial greedy (each overflow assignment in priority order takes the best expert with
room) is the tests' reference and the benchmarks' yardstick (tests/reference.py), not this path.
With global scope the rooms and thresholds are the group's, from fixed-size collectives
([B] room, [B, C] top proposal keys per round; with C on the device, the room-th key by radix
select: 8 [B, 256] gathers per round), so every rank commits the same placements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Count
from ..group import RoutingGroup
from ..priority import NOT_ROUTED, assignment_keys
from .routing_plan import bin_major, group_kth_keys, group_top_keys, top_keys

@dataclass(frozen=True)
class Bins:
    """Where each expert's load is capped: expert_to_bin [E], num_bins B, experts_per_bin m."""

    expert_to_bin: torch.Tensor
    num_bins: int
    experts_per_bin: int

    @property
    def experts(self) -> torch.Tensor:
        """[B, m] int64: the experts of each bin."""
        order = torch.argsort(self.expert_to_bin, stable=True)
        return order.view(self.num_bins, self.experts_per_bin)

    def per_bin(self, per_expert: torch.Tensor) -> torch.Tensor:
        """[E] -> [B]: sum over each bin's experts."""
        out = torch.zeros(self.num_bins, dtype=per_expert.dtype, device=per_expert.device)
        return out.index_add_(0, self.expert_to_bin, per_expert)


@dataclass
class Rerouted:
    """The plan after the rounds: new_map, weights, tokens per expert, assignments placed."""

    routing_map: torch.Tensor
    weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_rerouted: torch.Tensor


def reroute(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    kept_map: torch.Tensor,
    weights: torch.Tensor,
    kept_per_expert: torch.Tensor,
    bins: Bins,
    capacity: Count,
    rounds: int,
    priority: str,
    topk: int,
    seed: int = 0,
    token_offset: Count = 0,
    group: Optional[RoutingGroup] = None,
    carried: Optional[torch.Tensor] = None,
) -> Rerouted:
    """Place the router assignments drop removed (routing_map & ~kept_map) in `rounds` rounds.

    Args:
        scores: [T, E] full router scores; rerouted assignments weigh their new expert's score.
        routing_map: [T, E] bool, the router's top-k; kept_map: [T, E] bool, what drop kept.
        weights: [T, E] the kept assignments' weights.
        kept_per_expert: [E] int64, this rank's kept assignments per expert.
        bins, capacity: the cap C per bin (a 0-dim tensor when it stays on the device: global
            scope, eager); rounds: how many proposal rounds.
        priority, seed, token_offset: the priority keys of the pending assignments.
        topk: k; a token has at most k pending assignments (its router picks).
        group: global scope's ranks (room and acceptance are group-wide), or None.
        carried: [T, E] the router's weights: a rerouted assignment then weighs the weight of
            the assignment it replaces (reroute_weight "carry"); None: its new expert's score.
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    pending_keys = assignment_keys(scores, routing_map & ~kept_map, priority, seed, token_offset)
    used = routing_map.clone()
    new_map, weights = kept_map.clone(), weights.clone()
    kept_per_bin = bins.per_bin(kept_per_expert)
    if group is not None:
        kept_per_bin = group.all_gather(kept_per_bin).sum(0)
    room = capacity - kept_per_bin  # [B]
    preference = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # [T, E]
    bin_experts = bins.experts
    rerouted = torch.zeros(num_experts, dtype=torch.int64, device=device)
    for _ in range(rounds):
        # A token's pending assignments ("items"), highest key first: [T, k], of which
        # num_pending are real (the rest NOT_ROUTED).
        items = torch.topk(pending_keys, topk, dim=1)
        num_pending = (pending_keys != NOT_ROUTED).sum(1, keepdim=True)
        open_in_order = (~used & (room[bins.expert_to_bin] > 0)).gather(1, preference)
        item = open_in_order.cumsum(1) - 1  # the item proposing to each open expert, in order
        proposing = open_in_order & (item < num_pending)
        item = item.clamp(0, topk - 1)
        keys = torch.empty_like(pending_keys).scatter_(
            1, preference, torch.where(proposing, items.values.gather(1, item), NOT_ROUTED)
        )  # [T, E]: the key of the item proposing to each expert
        accepted = _accept(keys, bin_experts, bins, room, capacity, group)  # [T, E] bool
        # Commit: the new assignments, their weights, the rooms, and the items they came from.
        new_map |= accepted
        if carried is None:
            new_weights = scores.to(weights.dtype)
        else:  # the router's weight of the expert each proposing item came from
            origin = items.indices.gather(1, item)  # [T, E] in preference order
            new_weights = torch.empty_like(weights).scatter_(
                1, preference, carried.to(weights.dtype).gather(1, origin))
        weights = torch.where(accepted, new_weights, weights)
        used |= accepted
        placed = accepted.sum(0, dtype=torch.int64)
        rerouted += placed
        placed_per_bin = bins.per_bin(placed)
        room = room - (group.all_gather(placed_per_bin).sum(0) if group is not None else placed_per_bin)
        done_items = torch.zeros(num_tokens, topk + 1, dtype=torch.bool, device=device)
        done_items.scatter_(1, torch.where(accepted.gather(1, preference), item, topk), True)
        done = torch.zeros_like(used).scatter_(1, items.indices, done_items[:, :topk])
        pending_keys = pending_keys.masked_fill(done, NOT_ROUTED)
    return Rerouted(new_map, weights, kept_per_expert + rerouted, rerouted.sum())


def _accept(
    keys: torch.Tensor,
    bin_experts: torch.Tensor,
    bins: Bins,
    room: torch.Tensor,
    capacity: Count,
    group: Optional[RoutingGroup],
) -> torch.Tensor:
    """[T, E] bool: the proposals each bin accepts, its `room` largest keys (room <= capacity).

    A capacity on the device (global scope, eager) sizes no [B, C] gather: the group selects the
    room-th key by radix (group_kth_keys) instead."""
    rows = bin_major(keys, bin_experts)
    if isinstance(capacity, torch.Tensor):
        threshold = group_kth_keys(rows, room, group)
    else:
        top = top_keys(rows, capacity)  # [B, C] descending
        if group is not None:
            top = group_top_keys(top, group)
        threshold = top.gather(1, (room - 1).clamp(0, capacity - 1).unsqueeze(1)).squeeze(1)
    has_room = (room > 0)[bins.expert_to_bin]
    return (keys >= threshold[bins.expert_to_bin]) & (keys != NOT_ROUTED) & has_room
