"""Token Reroute in a bounded number of rounds, each a fixed sequence of device ops.

A round: every pending overflow assignment proposes its token's next-best expert (by score; ties:
lower index) that the token does not use and whose bin had room at the round's start (a token's
j-th pending assignment, by priority key, takes its j-th such expert); each bin accepts the
proposals with the largest keys up to its remaining room (a threshold, as drop does); the rest
stay pending for the next round. The cap is never exceeded, the originals kept are drop's, and
shapes depend only on (T, E, C): no host synchronization, so a CUDA graph can hold it.

The exact serial greedy (each overflow assignment in priority order takes the best expert with
room) is the tests' reference and the benchmarks' yardstick (tests/reference.py), not this path.
Alone, a bin accepts by rank: the proposals' key order is fixed across rounds (a proposal carries
its assignment's key), so one stable sort of their bins per round, taken in that order, finds
each bin's cutoff (the rank of the last proposal its room admits) and acceptance is a compare
of ranks. With global scope the rooms and thresholds are the group's, from fixed-size
collectives ([B] room, [B, C] top proposal keys per round, or [B, C_max] with C on the device and
a token bound; without a bound, the room-th key by radix select: 8 [B, 256] gathers per round),
so every rank commits the same placements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Count
from ..group import RoutingGroup
from ..layout import Bins
from ..priority import NOT_ROUTED
from .routing_plan import (
    CandidateItems,
    candidate_items,
    group_top_keys,
    kth_largest,
    kth_of_top,
    sort_small_ints,
    top_keys_per_bin,
)


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
    picks: Optional[CandidateItems] = None,
    capacity_slots: Optional[int] = None,
    eligible: Optional[torch.Tensor] = None,
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
        picks: the router's picks listed with their keys ([T, k], the torch backend's candidate
            state for policy reroute), when drop already listed them; None: listed here.
        capacity_slots: a host int no smaller than capacity (C itself, or its bound from
            CapacityConfig.max_tokens_per_rank): with a group, each round's thresholds come from
            one [B, slots] gather of top proposal keys; None (C on the device, unbounded): a
            radix select.
        eligible: [T, E] bool, the experts a token may move to (None: all it does not use).
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    expert_to_bin = bins.expert_to_bin
    if picks is None:
        picks = candidate_items(scores, routing_map, topk, priority, seed, token_offset)
    # The pending assignments (drop removed them), each token's ordered by key, highest first,
    # with the expert each came from: [T, k].
    by_key = torch.sort(picks.keys.masked_fill(kept_map.gather(1, picks.experts), NOT_ROUTED),
                        dim=1, descending=True)
    pending_keys, origin = by_key.values, picks.experts.gather(1, by_key.indices)
    still = pending_keys != NOT_ROUTED  # [T, k] pending
    # A proposal's key is its assignment's, so one order by key serves every round's acceptance:
    # each assignment's rank in it, [T, k] (the keys negated bitwise: an ascending stable sort).
    key_order = torch.sort(~pending_keys.reshape(-1), stable=True).indices
    key_rank = torch.empty_like(key_order).scatter_(
        0, key_order, torch.arange(key_order.numel(), device=device)).view_as(pending_keys)
    # Each token's experts by score (ties: lower index).
    preference = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # [T, E]
    # The bin of each preference slot (the expert itself when bins are experts), and the slots
    # the token does not use yet; the extra last column takes the writes of proposals that were
    # not accepted.
    preference_bins = preference if bins.are_experts else expert_to_bin.take(preference)
    free = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=device)
    unused = ~routing_map if eligible is None else eligible & ~routing_map
    free[:, :num_experts] = unused.gather(1, preference)
    kept_per_bin = bins.per_bin(kept_per_expert)
    room = capacity - (group.all_gather(kept_per_bin).sum(0) if group is not None else kept_per_bin)
    room_before = room
    # Open-expert counts fit the narrowest integer type that holds E (searchsorted runs on it).
    count_type = torch.int16 if num_experts < 2**15 else torch.int32
    targets = []
    for _ in range(rounds):
        # The j-th still pending assignment of a token proposes its j-th open expert: the first
        # preference position where the count of open experts reaches j + 1 (E: none left).
        open_experts = (room > 0).expand(num_tokens, -1).gather(1, preference_bins)
        open_experts &= free[:, :num_experts]
        position = torch.searchsorted(
            open_experts.cumsum(1, dtype=count_type), still.cumsum(1, dtype=count_type))
        proposing = still & (position < num_experts)
        target = preference.gather(1, position.clamp(max=num_experts - 1))  # [T, k]
        target_bins = target if bins.are_experts else expert_to_bin.take(target)
        target_bins = target_bins.masked_fill(~proposing, bins.num_bins)
        if group is None:
            accepted, placed = _accepted_by_rank(key_rank, key_order, target_bins, room)
        else:
            accepted = _accepted_over_group(
                pending_keys.masked_fill(~proposing, NOT_ROUTED), target_bins, room, capacity_slots, group)
            placed = torch.zeros(bins.num_bins + 1, dtype=room.dtype, device=device).index_add_(
                0, target_bins.reshape(-1), accepted.reshape(-1).long())[: bins.num_bins]
            placed = group.all_gather(placed).sum(0)
        # Commit: the preference slots now used, the rooms, and the assignments placed.
        rejected = ~accepted
        free.scatter_(1, position.masked_fill(rejected, num_experts), False)
        room = room - placed
        targets.append(target.masked_fill(rejected, num_experts))
        still &= rejected
    if not targets:
        return Rerouted(kept_map, weights, kept_per_expert, kept_per_expert.new_zeros(()))
    columns = torch.cat(targets, 1)  # [T, rounds * k], E where nothing was placed
    placed_map = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=device)
    placed_map = placed_map.scatter_(1, columns, True)[:, :num_experts]
    # A placed assignment weighs its new expert's score, or what its origin weighed (carry).
    placed_weights = (scores.gather(1, columns.clamp(max=num_experts - 1)) if carried is None
                      else carried.gather(1, origin).repeat(1, rounds))
    weights_at = torch.zeros(num_tokens, num_experts + 1, dtype=weights.dtype, device=device)
    weights_at = weights_at.scatter_(1, columns, placed_weights.to(weights.dtype))[:, :num_experts]
    if group is None and bins.are_experts:
        rerouted = room_before - room  # alone, each expert its own bin: what its room lost
    else:
        rerouted = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).index_add_(
            0, columns.reshape(-1), torch.ones_like(columns.reshape(-1)))[:num_experts]
    return Rerouted(kept_map | placed_map, torch.where(placed_map, weights_at, weights),
                    kept_per_expert + rerouted, rerouted.sum())


def _accepted_by_rank(
    key_rank: torch.Tensor, key_order: torch.Tensor, bins: torch.Tensor, room: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted [T, k] bool, placed [B] int64): each bin accepts its first proposals in key
    order, up to its room.

    key_order [T * k]: the proposals' flat positions, largest key first; key_rank [T, k]: each
    proposal's place in that order; bins [T, k] the target bins (B: no proposal), room [B].
    One stable sort of the bins taken in key order groups each bin's proposals in key order;
    the rank of the last one a bin admits is its cutoff, so acceptance is a compare of ranks
    and nothing is scattered back.
    """
    num_bins = room.shape[0]
    num_items = key_order.numel()
    sorted_bins, ranks = sort_small_ints(bins.reshape(-1).take(key_order), num_bins + 1)
    start = torch.searchsorted(sorted_bins, torch.arange(num_bins + 1, device=bins.device,
                                                         dtype=sorted_bins.dtype))  # [B + 1]
    placed = torch.minimum(start[1:] - start[:-1], room)
    last = ranks.take((start[:-1] + placed - 1).clamp(0, num_items - 1))
    cutoff = torch.cat([torch.where(placed > 0, last, -1), last.new_full((1,), -1)])
    return key_rank <= cutoff.take(bins), placed


def _accepted_over_group(
    keys: torch.Tensor, bins: torch.Tensor, room: torch.Tensor, slots: Optional[int], group: RoutingGroup
) -> torch.Tensor:
    """[T, k] bool: the proposals their bins accept, each bin its largest keys group-wide up
    to its room: the room-th largest key of each bin over the group is the threshold, from one
    [B, slots] gather when a host bound on C is known (room <= C <= slots), else by radix select.

    keys [T, k] (NOT_ROUTED: no proposal), bins [T, k] their target bins (B: none, a bin of
    their own without room), room [B].
    """
    num_bins = room.shape[0]
    flat_bins, flat_keys = bins.reshape(-1), keys.reshape(-1)
    room_or_none = torch.cat([room, room.new_zeros(1)])
    if slots is None:
        threshold = kth_largest(flat_keys, flat_bins, num_bins + 1, room_or_none, group)
    else:
        top = group_top_keys(top_keys_per_bin(flat_keys, flat_bins, num_bins + 1, slots)[:num_bins], group)
        threshold = kth_of_top(top, room)  # [B]
        threshold = torch.cat([threshold, threshold.new_zeros(1)])
    return (keys >= threshold.take(bins)) & (room_or_none > 0).take(bins)
