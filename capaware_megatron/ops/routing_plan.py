"""Torch twins of the Triton kernels in kernels/routing_plan.py: the steps of a plan.

    collect_candidates  the priority key of every candidate assignment (priority.py), and the
                        plan as if nothing overflowed: router picks keep the router weight,
                        expanded drop's local candidates take their score
    bin_thresholds      [B] int64, the C-th largest key of each bin
    bin_top_keys        [B, C] int64, each bin's largest keys (global scope gathers them)
    bin_major           [B, T * m] int64, each bin's keys in one row (global scope, C on the
                        device: group_kth_keys selects from them)
    drop_below          clears candidates with key < threshold -> exactly min(C, load) per bin

The candidate state of this backend is the [T, E] int64 key matrix (NOT_ROUTED off the
candidates); the Triton backend keeps per-expert key lists instead. Every op is a fixed sequence
of device ops whose output shapes depend only on (T, E, C): no host synchronization.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..group import RoutingGroup
from ..priority import NOT_ROUTED, assignment_keys

_SIGN_BIT = NOT_ROUTED  # int64 with only the sign bit set


def router_or_score(
    routing_map: torch.Tensor, probs: Optional[torch.Tensor], scores: torch.Tensor
) -> torch.Tensor:
    """[T, E]: the weight each candidate gets if kept: the router's for its picks, else the score."""
    return scores if probs is None else torch.where(routing_map, probs, scores.to(probs.dtype))


def top_keys(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[B, L] -> [B, count]: each row's largest keys, descending, padded with NOT_ROUTED."""
    top = torch.topk(rows, min(count, rows.shape[1]), dim=1, sorted=True).values
    return torch.nn.functional.pad(top, (0, count - top.shape[1]), value=NOT_ROUTED)


def bin_major(keys: torch.Tensor, bin_experts: torch.Tensor) -> torch.Tensor:
    """[T, E] -> [B, T * m]: every bin's keys in one row."""
    return keys[:, bin_experts].permute(1, 0, 2).reshape(bin_experts.shape[0], -1)


def collect_candidates(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    priority: str,
    seed: int = 0,
    token_offset: Union[int, torch.Tensor] = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [T, E] int64, keep [T, E] bool, weights [T, E]): the plan before capacity.

    keys are the backend's candidate state (NOT_ROUTED off the candidates); every candidate is
    kept, router picks with the router weight (probs, default the score), others with the score.
    """
    keys = assignment_keys(scores, candidates, priority, seed, token_offset)
    weights = router_or_score(routing_map, probs, scores)
    return keys, candidates.clone(), weights.masked_fill(~candidates, 0)


def bin_thresholds(keys: torch.Tensor, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] int64: the capacity-th largest key of each bin (NOT_ROUTED when it has fewer).

    Keys are unique, so ``key >= threshold`` keeps exactly min(capacity, load) per bin.
    """
    return bin_top_keys(keys, bin_experts, capacity)[:, capacity - 1]


def bin_top_keys(keys: torch.Tensor, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, C] int64: each bin's largest keys, padded with NOT_ROUTED."""
    return top_keys(bin_major(keys, bin_experts), capacity)


def group_top_keys(top: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """[B, C] this rank's top keys per bin -> [B, C] the group's, from one fixed-size gather.

    The group-wide top-C of a bin lies within the union of every rank's own top-C.
    """
    num_bins, capacity = top.shape
    merged = group.all_gather(top).permute(1, 0, 2).reshape(num_bins, -1)  # [B, W * C]
    return top_keys(merged, capacity)


def group_kth_keys(rows: torch.Tensor, kth: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """[B, L] this rank's keys per bin, kth [B] int64 -> [B] the kth-largest key of each bin
    over the group (NOT_ROUTED where the group holds fewer than kth).

    For a kth that stays on the device (C from the group's token counts, which are never read
    on the host), so no [B, C] gather can be sized: a radix select over the keys' bit pattern,
    8-bit digits from the top, as the Triton select kernel runs within a bin, with each digit's
    [B, 256] histogram summed over the group: 8 fixed-size gathers, the same on every rank.
    """
    num_bins = rows.shape[0]
    device = rows.device
    real = rows != NOT_ROUTED
    unsigned = rows ^ _SIGN_BIT  # the sign bit flipped: digits compare in unsigned order
    digits = torch.arange(256, device=device)
    prefix = torch.zeros(num_bins, dtype=torch.int64, device=device)  # the digits found so far
    remaining = kth.to(torch.int64)  # the rank still sought among the keys that share `prefix`
    total = torch.zeros_like(prefix)
    for step in range(8):
        shift = 56 - 8 * step
        matches = real if step == 0 else real & ((unsigned & (-1 << (shift + 8))) == prefix[:, None])
        digit = (unsigned >> shift) & 255
        hist = torch.zeros(num_bins, 256, dtype=torch.int64, device=device)
        hist = group.all_gather(hist.scatter_add_(1, digit, matches.long())).sum(0)  # [B, 256]
        if step == 0:
            total = hist.sum(1)
        at_least = hist.flip(1).cumsum(1).flip(1)  # keys with this digit or a larger one
        chosen = torch.where(at_least >= remaining[:, None], digits, 0).amax(1)
        remaining = remaining - torch.where(digits > chosen[:, None], hist, 0).sum(1)
        prefix = prefix | (chosen << shift)
    return torch.where(total >= kth, prefix ^ _SIGN_BIT, NOT_ROUTED)


def drop_below(
    keys: torch.Tensor,
    thresholds: torch.Tensor,
    expert_to_bin: torch.Tensor,
    keep: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, weights, kept per expert [E] int64): clears the candidates below their bin's threshold."""
    dropped = keep & (keys < thresholds[expert_to_bin])
    keep = keep & ~dropped
    return keep, weights.masked_fill(dropped, 0), keep.sum(0, dtype=torch.int64)
