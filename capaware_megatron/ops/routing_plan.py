"""Torch twins of the Triton kernels in kernels/routing_plan.py: the steps of a plan.

    collect_candidates  each token's candidate assignments and their priority keys (priority.py),
                        and the plan as if nothing overflowed: router picks keep the router
                        weight, expanded drop's local candidates take their score
    bin_thresholds      [B] int64, the C-th largest key of each bin
    bin_top_keys        [B, C] int64, each bin's largest keys (global scope gathers them)
    bin_items           every candidate's key and bin, flat (global scope with C on the device:
                        kth_largest selects from them over the group)
    drop_below          clears candidates with key < threshold -> exactly min(C, load) per bin

The candidate state of this backend lists each token's candidates, [T, K] with K the most a
token has (k for the router's picks, k + the local experts for expanded drop), so capacity works
on T * K assignments instead of all T * E pairs; the Triton backend keeps per-expert key lists.
Thresholds come from one topk over dense bin rows when experts are few per candidate, else from
sorting the listed keys by bin (kth_largest; over a group, a radix select as the Triton select
kernel runs). Every op is a fixed sequence of device ops whose output shapes depend only on
(T, E, K, C): no host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..group import RoutingGroup
from ..priority import NOT_ROUTED, listed_keys

_SIGN_BIT = NOT_ROUTED  # int64 with only the sign bit set
DENSE_EXPERTS_PER_CANDIDATE = 8
"""bin_thresholds spreads keys over dense [B, T * m] rows up to E = 8 K (measured on CPU with
bench_planner.py: a topk over the rows beats two sorts of the T * K keys at E / K = 4 and 8,
loses at 32)."""


@dataclass
class CandidateItems:
    """The torch backend's candidate state: each token's candidates, listed.

    Attributes:
        experts: [T, K] int64, the experts of each token's candidates, then other experts as
            fillers (distinct within a row).
        keys: [T, K] int64, their priority keys; NOT_ROUTED for the fillers.
    """

    experts: torch.Tensor
    keys: torch.Tensor


def router_or_score(
    routing_map: torch.Tensor, probs: Optional[torch.Tensor], scores: torch.Tensor
) -> torch.Tensor:
    """[T, E]: the weight each candidate gets if kept: the router's for its picks, else the score."""
    return scores if probs is None else torch.where(routing_map, probs, scores.to(probs.dtype))


def top_keys(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[B, L] -> [B, count]: each row's largest keys, descending, padded with NOT_ROUTED."""
    top = torch.topk(rows, min(count, rows.shape[1]), dim=1, sorted=True).values
    return torch.nn.functional.pad(top, (0, count - top.shape[1]), value=NOT_ROUTED)


def listed(mask: torch.Tensor, count: int) -> torch.Tensor:
    """[T, E] bool with at most `count` True per row -> [T, count] int64: their columns first,
    then other columns (distinct within a row)."""
    return torch.topk(mask.view(torch.uint8), count, dim=1, sorted=False).indices


def candidate_items(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    count: int,
    priority: str,
    seed: int = 0,
    token_offset: Union[int, torch.Tensor] = 0,
) -> CandidateItems:
    """Each token's candidates (at most `count` per row of the [T, E] mask), listed with their
    priority keys."""
    experts = listed(candidates, count)
    keys = listed_keys(scores, experts, candidates.gather(1, experts), priority, seed, token_offset)
    return CandidateItems(experts, keys)


def collect_candidates(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    priority: str,
    seed: int = 0,
    token_offset: Union[int, torch.Tensor] = 0,
    max_candidates: Optional[int] = None,
) -> tuple[CandidateItems, torch.Tensor, torch.Tensor]:
    """(items, keep [T, E] bool, weights [T, E]): the plan before capacity.

    items are the backend's candidate state; every candidate is kept, router picks with the
    router weight (probs, default the score), others with the score. max_candidates: the most
    candidates a token has (None: E).
    """
    num_experts = scores.shape[1]
    count = num_experts if max_candidates is None else min(max_candidates, num_experts)
    items = candidate_items(scores, candidates, count, priority, seed, token_offset)
    weights = router_or_score(routing_map, probs, scores)
    return items, candidates.clone(), weights.masked_fill(~candidates, 0)


def expert_bins(bin_experts: torch.Tensor) -> torch.Tensor:
    """[B, m] the experts of each bin (all E of them) -> [E] int64, the bin of each expert."""
    num_bins, per_bin = bin_experts.shape
    bins = torch.arange(num_bins, device=bin_experts.device).repeat_interleave(per_bin)
    return torch.empty_like(bins).scatter_(0, bin_experts.reshape(-1), bins)


def bin_items(items: CandidateItems, expert_to_bin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [N], bins [N]): every listed candidate's key (NOT_ROUTED fillers) and its bin."""
    return items.keys.reshape(-1), expert_to_bin.take(items.experts).reshape(-1)


def bin_thresholds(items: CandidateItems, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] int64: the capacity-th largest key of each bin (NOT_ROUTED when it has fewer).

    Keys are unique, so ``key >= threshold`` keeps exactly min(capacity, load) per bin. With few
    experts per listed candidate (E <= DENSE_EXPERTS_PER_CANDIDATE * K) each bin's keys are
    spread over a [B, T * m] matrix and one topk finds the thresholds; with many, mostly empty
    rows would cost more than sorting the T * K listed keys by bin.
    """
    num_bins, per_bin = bin_experts.shape
    num_tokens, listed_per_token = items.keys.shape
    expert_to_bin = expert_bins(bin_experts)
    if bin_experts.numel() > DENSE_EXPERTS_PER_CANDIDATE * listed_per_token:
        keys, bins = bin_items(items, expert_to_bin)
        kth = torch.full((num_bins,), capacity, dtype=torch.int64, device=keys.device)
        return kth_largest(keys, bins, num_bins, kth)
    row_length = num_tokens * per_bin
    if capacity > row_length:
        return torch.full((num_bins,), NOT_ROUTED, dtype=torch.int64, device=items.keys.device)
    # Bin-major position of (t, e): row bin(e), column t * m + e's place among its bin's experts.
    place = torch.empty_like(expert_to_bin).scatter_(
        0, bin_experts.reshape(-1), torch.arange(per_bin, device=bin_experts.device).repeat(num_bins))
    token = torch.arange(num_tokens, device=items.keys.device).unsqueeze(1)
    position = expert_to_bin.take(items.experts) * row_length + token * per_bin + place.take(items.experts)
    rows = torch.full((num_bins * row_length,), NOT_ROUTED, dtype=torch.int64, device=items.keys.device)
    rows = rows.scatter_(0, position.reshape(-1), items.keys.reshape(-1)).view(num_bins, row_length)
    return torch.topk(rows, capacity, dim=1, sorted=False).values.amin(1)


def bin_top_keys(items: CandidateItems, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, C] int64: each bin's largest keys, descending, padded with NOT_ROUTED."""
    keys, bins = bin_items(items, expert_bins(bin_experts))
    return top_keys_per_bin(keys, bins, bin_experts.shape[0], capacity)


CPU_RADIX_SORT_MIN = 32768
"""torch's CPU stable sort of integers uses a radix sort from this many elements on; below, a
comparison sort (measured, uint8: 16384 in 0.48 ms, 32768 padded ones in 0.13 ms, 4096 in 0.10
ms, 512 in 0.01 ms): padding up to it pays from a sixth of it on."""


def sort_small_ints(values: torch.Tensor, num_values: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N] in [0, num_values) -> (sorted [N], in the narrowest integer type that holds
    them; the stable order's indices [N] int64).

    Radix passes are per byte, so the narrow type sorts fastest; on CPU an array of a sixth of
    CPU_RADIX_SORT_MIN or more, but short of it, is padded up to it with the largest value
    (sorted last, stably after the real ones).
    """
    narrow = torch.uint8 if num_values <= 2**8 else torch.int16 if num_values <= 2**15 else torch.int32
    count = values.numel()
    values = values.to(narrow)
    if values.device.type == "cpu" and CPU_RADIX_SORT_MIN // 6 <= count < CPU_RADIX_SORT_MIN:
        values = torch.nn.functional.pad(values, (0, CPU_RADIX_SORT_MIN - count), value=num_values - 1)
    ordered = torch.sort(values, stable=True)
    return ordered.values[:count], ordered.indices[:count]


def _grouped_by_bin(
    keys: torch.Tensor, bins: torch.Tensor, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys grouped by bin, descending within each [N], each bin's first position [B], its
    real keys [B]): two sorts of the N keys, by key, then (stable) by bin."""
    key_order = torch.sort(keys, descending=True).indices
    by_bin = sort_small_ints(bins.take(key_order), num_bins)[1]
    empty = torch.zeros(num_bins, dtype=torch.int64, device=keys.device)
    per_bin = empty.index_add(0, bins, torch.ones_like(bins))
    real = empty.index_add(0, bins, (keys != NOT_ROUTED).long())
    return keys.take(key_order.take(by_bin)), per_bin.cumsum(0) - per_bin, real


def top_keys_per_bin(keys: torch.Tensor, bins: torch.Tensor, num_bins: int, count: int) -> torch.Tensor:
    """keys [N] in bins [N] -> [B, count]: each bin's largest keys, descending, padded with
    NOT_ROUTED."""
    if keys.numel() == 0:
        return torch.full((num_bins, count), NOT_ROUTED, dtype=torch.int64, device=keys.device)
    ordered, first, real = _grouped_by_bin(keys, bins, num_bins)
    slot = torch.arange(count, device=keys.device)
    top = ordered.take((first.unsqueeze(1) + slot).clamp(max=keys.numel() - 1))
    return top.masked_fill(slot >= real.unsqueeze(1), NOT_ROUTED)


def group_top_keys(top: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """[B, C] this rank's top keys per bin -> [B, C] the group's, from one fixed-size gather.

    The group-wide top-C of a bin lies within the union of every rank's own top-C.
    """
    num_bins, capacity = top.shape
    merged = group.all_gather(top).permute(1, 0, 2).reshape(num_bins, -1)  # [B, W * C]
    return top_keys(merged, capacity)


def kth_of_top(top: torch.Tensor, kth: Union[int, torch.Tensor]) -> torch.Tensor:
    """top [B, S] each bin's largest keys, descending; kth an int, or a 0-dim or [B] tensor that
    stays on the device (C, a bin's room) -> [B] each bin's kth-largest key. A kth beyond S takes
    the S-th, so a threshold never admits more than S keys; a kth below 1 takes the largest."""
    if isinstance(kth, torch.Tensor):
        index = (kth - 1).clamp(0, top.shape[1] - 1).expand(top.shape[0]).unsqueeze(1)
        return top.gather(1, index).squeeze(1)
    return top[:, kth - 1]


def kth_largest(
    keys: torch.Tensor,
    bins: torch.Tensor,
    num_bins: int,
    kth: torch.Tensor,
    group: Optional[RoutingGroup] = None,
) -> torch.Tensor:
    """keys [N] (NOT_ROUTED: none) in bins [N], kth [B] int64 -> [B] the kth-largest key of each
    bin (NOT_ROUTED where it holds fewer than kth; a bin with kth < 1 gets some key, which its
    caller masks), over the group's keys when one is given.

    kth may stay on the device (C from the group's token counts, never read on the host):
    nothing is sized by it. Alone: two sorts of the keys (_grouped_by_bin). Over a group: a radix
    select over the keys' bit pattern, 8-bit digits from the top, as the Triton select kernel
    runs within a bin: 8 passes over the N keys, each a [B, 256] digit histogram summed over the
    group (8 fixed-size gathers, the same on every rank), which no rank could size by C.
    """
    device = keys.device
    if group is None:
        if keys.numel() == 0:
            return torch.full((num_bins,), NOT_ROUTED, dtype=torch.int64, device=device)
        ordered, first, real = _grouped_by_bin(keys, bins, num_bins)
        kth_key = ordered.take((first + kth - 1).clamp(0, keys.numel() - 1))
        return torch.where((kth >= 1) & (kth <= real), kth_key, NOT_ROUTED)
    real = keys != NOT_ROUTED
    unsigned = keys ^ _SIGN_BIT  # the sign bit flipped: digits compare in unsigned order
    digits = torch.arange(256, device=device)
    prefix = torch.zeros(num_bins, dtype=torch.int64, device=device)  # the digits found so far
    remaining = kth.to(torch.int64)  # the rank still sought among the keys that share `prefix`
    total = torch.zeros_like(prefix)
    slots = bins * 256
    for step in range(8):
        shift = 56 - 8 * step
        digit = (unsigned >> shift) & 255
        matches = real if step == 0 else real & ((unsigned & (-1 << (shift + 8))) == prefix.take(bins))
        hist = torch.zeros(num_bins * 256, dtype=torch.int64, device=device)
        hist = hist.index_add_(0, slots + digit, matches.long()).view(num_bins, 256)
        hist = group.all_gather(hist).sum(0)
        if step == 0:
            total = hist.sum(1)
        at_least = hist.flip(1).cumsum(1).flip(1)  # keys with this digit or a larger one
        chosen = torch.where(at_least >= remaining.unsqueeze(1), digits, 0).amax(1)
        remaining = remaining - torch.where(digits > chosen.unsqueeze(1), hist, 0).sum(1)
        prefix = prefix | (chosen << shift)
    return torch.where(total >= kth, prefix ^ _SIGN_BIT, NOT_ROUTED)


def drop_below(
    items: CandidateItems,
    thresholds: torch.Tensor,
    expert_to_bin: torch.Tensor,
    keep: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, weights, kept per expert [E] int64): clears the candidates below their bin's threshold."""
    real = items.keys != NOT_ROUTED
    dropped = real & (items.keys < thresholds.take(expert_to_bin.take(items.experts)))  # [T, K]
    dropped_map = torch.zeros_like(keep).scatter_(1, items.experts, dropped)
    kept = torch.zeros(keep.shape[1], dtype=torch.int64, device=keep.device)
    kept = kept.index_add_(0, items.experts.reshape(-1), (real & ~dropped).reshape(-1).long())
    return keep & ~dropped_map, weights.masked_fill(dropped_map, 0), kept
