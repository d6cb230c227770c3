"""The capacity-aware routing plan (torch reference implementation, the CPU path).

Notation: T tokens on this rank, E experts, k experts per token (the router's top-k), B capacity
bins (an expert each for scopes local/global, an expert-parallel rank each for scope device), m
experts per bin, C a bin's capacity, W ranks in the group (global scope).

Pipeline (each step an op of the backend: this module's torch twins or the Triton kernels):
    collect_candidates  the priority key of every candidate assignment (priority.py), and the
                        plan as if nothing overflowed: router picks keep the router weight,
                        expanded drop's local candidates take their score
    bin_thresholds      [B] int64, the C-th largest key of each bin (group-wide in global scope)
    drop_below          clears candidates with key < threshold -> exactly min(C, load) per bin
    reroute             overflow -> next-best experts with room, exact serial order, vectorised
                        in rounds; a new assignment takes its score as weight

Keys are unique, so a threshold keeps exactly the top-C candidates of a bin and a distributed
caller needs only the per-bin top-C keys of every rank to reproduce the single-process plan.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .config import TRITON_MAX_EXPERTS, CapacityConfig, expert_capacity
from .group import RoutingGroup
from .priority import NOT_ROUTED, assignment_keys, decode_token

ExpertSet = Union[Sequence[int], torch.Tensor]
CapacityFn = Callable[[int, int, int, float, int], int]
_MIN_WINDOW = 256  # fewest overflow items a reroute round looks at
_FIRST_PREFERENCES = 16  # preferences a reroute proposal searches before the whole row

__all__ = ["RoutingPlan", "plan_routing"]


@dataclass
class RoutingPlan:
    """What reaches each expert after the capacity plan.

    Attributes:
        routing_map: [T, E] bool, kept and rerouted assignments.
        probs: [T, E] combine weights, 0 exactly where routing_map is False.
        capacity: C of one bin (an expert; an EP rank for scope "device"). T (or the group's token
            count) when nothing is capped: dropless, decode guard or training.
        tokens_per_expert_before: [E] int64, assignments per expert in the router's map.
        tokens_per_expert_after: [E] int64, assignments per expert in the plan.
        num_dropped: 0-dim int64, router assignments that lost their expert and found no other.
        num_rerouted: 0-dim int64, plan assignments outside the router's map (reroute, expanded).
    """

    routing_map: torch.Tensor
    probs: torch.Tensor
    capacity: int
    tokens_per_expert_before: torch.Tensor
    tokens_per_expert_after: torch.Tensor
    num_dropped: torch.Tensor
    num_rerouted: torch.Tensor


@dataclass(frozen=True)
class _Bins:
    """Where each expert's load is capped: expert_to_bin [E], num_bins B, experts_per_bin m."""

    expert_to_bin: torch.Tensor
    num_bins: int
    experts_per_bin: int

    @property
    def experts(self) -> torch.Tensor:
        """[B, m] int64: the experts of each bin."""
        order = torch.argsort(self.expert_to_bin, stable=True)
        return order.view(self.num_bins, self.experts_per_bin)


def plan_routing(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    cfg: Union[CapacityConfig, Mapping[str, Any]],
    *,
    local_experts: Optional[ExpertSet] = None,
    expert_to_rank: Optional[ExpertSet] = None,
    probs: Optional[torch.Tensor] = None,
    topk: Optional[int] = None,
    group: Optional[RoutingGroup] = None,
    training: bool = False,
    validate: bool = True,
    capacity_fn: CapacityFn = expert_capacity,
) -> RoutingPlan:
    """Cap every expert's (or EP rank's) load and decide what is kept, dropped or moved.

    Args:
        scores: [T, E] full router probabilities (softmax over all experts), fp32/bf16/fp16.
        routing_map: [T, E] bool, the router's top-k choice.
        cfg: the capacity configuration, or a mapping of its fields (unknown keys are refused).
        local_experts: experts hosted on this rank (indices or a [E] bool mask), or a [T, E] bool
            mask of each token's own device's experts; policy expanded.
        expert_to_rank: [E] EP rank hosting each expert; scope device.
        probs: [T, E] the router's combine weights for routing_map (default scores * routing_map);
            kept assignments keep them, rerouted ones take ``scores``.
        topk: k; inferred from routing_map (a host sync) when None.
        group: the ranks a global-scope plan spans; None is a group of one.
        training: the module's mode; capacity applies in training only with apply_in_training.
        capacity_fn: C from (tokens, k, bins, gamma, min_capacity); default Megatron-Core's
            formula (``expert_capacity``), the DeepSpeed gate passes DeepSpeed's float32 one.
        validate: check values too (scores and probs finite, uniform k, index ranges): the
            boundary check, which syncs with the host; shape, dtype and type checks always run.

    Returns:
        RoutingPlan.
    """
    cfg = _as_capacity_config(cfg)
    num_tokens, num_experts, topk = _check_inputs(scores, routing_map, probs, topk, validate)
    tokens_before = routing_map.sum(0, dtype=torch.int64)

    global_group = _check_group(cfg, group)
    bins = _bins(cfg, expert_to_rank, num_experts, scores.device)
    local_mask = _local_mask(cfg, local_experts, num_tokens, num_experts, scores.device, validate)

    token_offset, group_tokens = 0, num_tokens
    if global_group is not None:
        token_offset, group_tokens, topk = _group_layout(global_group, num_tokens, topk, scores.device)

    capped = not cfg.is_dropless and (cfg.apply_in_training or not training)
    # Decode guard: a step whose mean load is below min_capacity is never capped.
    if not capped or group_tokens * topk < cfg.min_capacity * num_experts or group_tokens == 0:
        return _identity_plan(
            routing_map,
            _router_weights(probs, scores, routing_map),
            group_tokens * bins.experts_per_bin,
            tokens_before,
        )

    capacity = capacity_fn(
        group_tokens,
        topk,
        bins.num_bins,
        cfg.capacity_factor,
        cfg.min_capacity * bins.experts_per_bin,
    )
    candidates = routing_map | local_mask if cfg.policy == "expanded" else routing_map
    ops = _ops_for(cfg.backend, scores)
    lists, keep, weights = ops.collect_candidates(
        scores, candidates, routing_map, probs, cfg.priority, cfg.seed, token_offset
    )
    if global_group is None:
        thresholds = ops.bin_thresholds(lists, bins.experts, capacity)
    else:
        thresholds = _group_thresholds(ops.bin_top_keys(lists, bins.experts, capacity), global_group)
    new_map, new_probs, tokens_after, dropped_keys = ops.drop_below(
        lists, thresholds, bins.expert_to_bin, keep, weights, cfg.policy == "reroute"
    )
    if cfg.policy == "expanded":
        num_rerouted = (new_map & ~routing_map).sum(dtype=torch.int64)
        num_dropped = (routing_map & ~new_map).sum(dtype=torch.int64)
    else:  # the candidates are the router's picks: what is not kept is dropped, unless rerouted
        num_dropped = tokens_before.sum() - tokens_after.sum()
        num_rerouted = torch.zeros_like(num_dropped)
    if cfg.policy == "reroute":
        token_idx = decode_token(dropped_keys, num_experts, token_offset)
        choice = _reroute(
            scores, routing_map, token_idx, dropped_keys, tokens_after, bins, capacity, global_group, ops
        )
        placed = choice >= 0
        token_idx, choice = token_idx[placed], choice[placed]
        new_map[token_idx, choice] = True
        new_probs[token_idx, choice] = scores[token_idx, choice].to(new_probs.dtype)
        tokens_after = tokens_after + torch.bincount(choice, minlength=num_experts)
        num_rerouted = placed.sum(dtype=torch.int64)
        num_dropped = num_dropped - num_rerouted
    if ops is not sys.modules[__name__] and _needs_grad(scores, probs):
        # Kernels write the weights outside autograd: take the same values through torch ops so
        # the router's gradient flows through the plan's combine weights.
        new_probs = torch.where(new_map, _router_or_score(routing_map, probs, scores), 0)
    if cfg.renormalize:
        new_probs = _renormalize(new_probs, _router_weights(probs, scores, routing_map))
    return RoutingPlan(
        routing_map=new_map,
        probs=new_probs,
        capacity=capacity,
        tokens_per_expert_before=tokens_before,
        tokens_per_expert_after=tokens_after,
        num_dropped=num_dropped,
        num_rerouted=num_rerouted,
    )


def _router_weights(
    probs: Optional[torch.Tensor], scores: torch.Tensor, routing_map: torch.Tensor
) -> torch.Tensor:
    """The router's combine weights: probs, or the scores of its picks when none are given."""
    return scores * routing_map if probs is None else probs


def _router_or_score(
    routing_map: torch.Tensor, probs: Optional[torch.Tensor], scores: torch.Tensor
) -> torch.Tensor:
    """[T, E]: the weight each candidate gets if kept: the router's for its picks, else the score."""
    return scores if probs is None else torch.where(routing_map, probs, scores.to(probs.dtype))


def _needs_grad(scores: torch.Tensor, probs: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        scores.requires_grad or (probs is not None and probs.requires_grad)
    )


def _group_layout(
    group: RoutingGroup, num_tokens: int, topk: int, device: torch.device
) -> tuple[int, int, int]:
    """(this rank's first token index, the group's token count, the group's k): one gather.

    A rank without tokens cannot infer k, so k comes from the ranks that have tokens; ranks that
    disagree raise the same error everywhere (no rank is left waiting in a collective).
    """
    mine = torch.tensor([num_tokens, topk if num_tokens else 0], device=device)
    layout = group.all_gather(mine).cpu()
    counts, ks = layout[:, 0], layout[:, 1][layout[:, 0] > 0]
    if ks.numel() and bool((ks != ks[0]).any()):
        raise ValueError(f"ranks of the group route with different top-k: {ks.tolist()}")
    group_topk = int(ks[0]) if ks.numel() else topk
    return int(counts[: group.rank].sum()), int(counts.sum()), group_topk


def _identity_plan(
    routing_map: torch.Tensor, probs: torch.Tensor, capacity: int, tokens_before: torch.Tensor
) -> RoutingPlan:
    zero = torch.zeros((), dtype=torch.int64, device=routing_map.device)
    return RoutingPlan(
        routing_map=routing_map,
        probs=probs.masked_fill(~routing_map, 0),
        capacity=capacity,
        tokens_per_expert_before=tokens_before,
        tokens_per_expert_after=tokens_before.clone(),
        num_dropped=zero,
        num_rerouted=zero.clone(),
    )


def _renormalize(new_probs: torch.Tensor, old_probs: torch.Tensor) -> torch.Tensor:
    """Scale each token's kept weights so they sum to what its router weights summed to."""
    old_sum = old_probs.float().sum(1, keepdim=True)
    new_sum = new_probs.float().sum(1, keepdim=True)
    scale = torch.where(new_sum > 0, old_sum / new_sum.clamp_min(torch.finfo(torch.float32).tiny), 0)
    return (new_probs.float() * scale).to(new_probs.dtype)


# ----------------------------------------------------------------------------------- thresholds


def _top_keys(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[B, L] -> [B, count]: each row's largest keys, descending, padded with NOT_ROUTED."""
    top = torch.topk(rows, min(count, rows.shape[1]), dim=1, sorted=True).values
    return torch.nn.functional.pad(top, (0, count - top.shape[1]), value=NOT_ROUTED)


def _bin_major(keys: torch.Tensor, bin_experts: torch.Tensor) -> torch.Tensor:
    """[T, E] -> [B, T * m]: every bin's keys in one row."""
    return keys[:, bin_experts].permute(1, 0, 2).reshape(bin_experts.shape[0], -1)


def collect_candidates(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    priority: str,
    seed: int = 0,
    token_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [T, E] int64, keep [T, E] bool, weights [T, E]): the plan before capacity.

    keys are the backend's candidate state (NOT_ROUTED off the candidates); every candidate is
    kept, router picks with the router weight (probs, default the score), others with the score.
    """
    keys = assignment_keys(scores, candidates, priority, seed, token_offset)
    weights = _router_or_score(routing_map, probs, scores)
    return keys, candidates.clone(), weights.masked_fill(~candidates, 0)


def bin_thresholds(keys: torch.Tensor, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] int64: the capacity-th largest key of each bin (NOT_ROUTED when it has fewer).

    Keys are unique, so ``key >= threshold`` keeps exactly min(capacity, load) per bin.
    """
    return bin_top_keys(keys, bin_experts, capacity)[:, capacity - 1]


def bin_top_keys(keys: torch.Tensor, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, C] int64: each bin's largest keys, padded with NOT_ROUTED."""
    return _top_keys(_bin_major(keys, bin_experts), capacity)


def drop_below(
    keys: torch.Tensor,
    thresholds: torch.Tensor,
    expert_to_bin: torch.Tensor,
    keep: torch.Tensor,
    weights: torch.Tensor,
    want_overflow: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(keep, weights, kept per expert [E] int64, dropped keys [M] or None).

    Clears the candidates whose key is below their bin's threshold.
    """
    dropped = keep & (keys < thresholds[expert_to_bin])
    keep = keep & ~dropped
    return (
        keep,
        weights.masked_fill(dropped, 0),
        keep.sum(0, dtype=torch.int64),
        keys[dropped] if want_overflow else None,
    )


def _group_thresholds(top: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """bin_thresholds over the whole group from every rank's [B, C] top keys: one gather.

    The group-wide top-C of a bin lies within the union of every rank's own top-C.
    """
    num_bins, capacity = top.shape
    gathered = group.all_gather(top)  # [W, B, C]
    merged = gathered.permute(1, 0, 2).reshape(num_bins, -1)
    return _top_keys(merged, capacity)[:, capacity - 1]


def _ops_for(backend: str, scores: torch.Tensor) -> ModuleType:
    """The module computing the plan's steps: this one (torch) or the Triton kernels."""
    triton_fits = scores.shape[1] <= TRITON_MAX_EXPERTS
    if backend == "torch" or (backend == "auto" and not (scores.is_cuda and triton_fits)):
        return sys.modules[__name__]
    try:
        from . import kernels
    except ImportError as err:
        if backend == "auto":
            return sys.modules[__name__]
        raise ImportError(f"backend='triton' is unavailable: {err}") from err
    if not scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (scores are on {scores.device}); "
            "on CPU use backend='torch' or 'auto', or TRITON_INTERPRET=1 for the interpreter"
        )
    return kernels


# ------------------------------------------------------------------------------------- reroute


def _reroute(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    token_idx: torch.Tensor,
    item_keys: torch.Tensor,
    kept_per_expert: torch.Tensor,
    bins: _Bins,
    capacity: int,
    group: Optional[RoutingGroup],
    ops: ModuleType,
) -> torch.Tensor:
    """[M] int64: the new expert of each overflow item (token_idx, item_keys), or -1 (dropped).

    Serial semantics, exact: overflow assignments are taken in priority order (highest key
    first); each moves to its token's best-scored expert (ties: lower index) whose bin still has
    room and that the token does not use yet; with no such expert it is dropped. With a group
    (global scope) room is group-wide and the overflow of all ranks is placed together,
    identically on every rank. The items may come in any order.
    """
    tokens, item_token = torch.unique(token_idx, return_inverse=True)
    rows, used = scores[tokens].float(), routing_map[tokens]
    kept_per_bin = torch.zeros(bins.num_bins, dtype=torch.int64, device=scores.device)
    kept_per_bin.index_add_(0, bins.expert_to_bin, kept_per_expert)
    mine = slice(0, token_idx.shape[0])
    if group is not None and group.world_size > 1:
        # Every rank's items and token table, concatenated in rank order.
        kept_per_bin = group.all_gather(kept_per_bin).sum(0)
        item_keys, item_counts = _gather_concat(group, item_keys, NOT_ROUTED)
        rows, token_counts = _gather_concat(group, rows, 0.0)
        used = _gather_concat(group, used, False)[0]
        first_token = torch.cumsum(token_counts, 0) - token_counts
        item_token = _gather_concat(group, item_token + first_token[group.rank], -1)[0]
        first = int(item_counts[: group.rank].sum())
        mine = slice(first, first + token_idx.shape[0])
    return _place_overflow(
        item_keys, item_token, rows, used, capacity - kept_per_bin, bins.expert_to_bin, ops
    )[mine]


def _gather_concat(
    group: RoutingGroup, tensor: torch.Tensor, fill: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's tensor (first dimensions differ) concatenated in rank order, and the lengths."""
    padded, lengths = group.gather_padded(tensor, fill)
    valid = torch.arange(padded.shape[1], device=padded.device) < lengths.unsqueeze(1)
    return padded[valid], lengths


def _place_overflow(
    item_keys: torch.Tensor,
    item_token: torch.Tensor,
    token_rows: torch.Tensor,
    token_used: torch.Tensor,
    room: torch.Tensor,
    expert_to_bin: torch.Tensor,
    ops: ModuleType,
) -> torch.Tensor:
    """Serial greedy placement, computed in at most B + 1 vectorised rounds.

    Args:
        item_keys: [M] int64 priority of each overflow assignment.
        item_token: [M] int64, each item's token (a row of the token table).
        token_rows: [U, E] fp32 scores of each token.
        token_used: [U, E] bool, experts each token already uses (its router top-k).
        room: [B] int64 free slots per bin.
        expert_to_bin: [E] int64.
        ops: the backend computing each round's proposals (propose_experts).

    Returns:
        [M] int64, the chosen expert or -1 (dropped).

    Each round, every pending item that would be the j-th of its token still pending takes the
    j-th best free expert of its token. Walking pending items by key, the choices are exactly the
    serial ones until the first item whose bin runs out of room; that prefix is committed and its
    bin is then full, so every round fills a bin or ends the work. A round looks only at a window
    of the first pending items (a prefix of the serial order, so its proposals are exact), sized
    from the previous round's commit: the work stays near O(M * E) instead of O(B * M * E).
    """
    num_items = item_keys.shape[0]
    device = item_keys.device
    choice = torch.full((num_items,), -1, dtype=torch.int64, device=device)
    if num_items == 0:
        return choice
    num_bins = room.shape[0]
    room = room.clone()
    token_used = token_used.clone()
    # The serial order: pending items sorted by key, highest first.
    pending = torch.argsort(item_keys, descending=True)
    preference = torch.sort(token_rows, dim=1, descending=True, stable=True).indices  # [U, E]
    window = max(_MIN_WINDOW, 2 * num_items // num_bins)
    while pending.numel() > 0:
        head, rest = pending[:window], pending[window:]
        slot = item_token[head]
        expert, has_choice = ops.propose_experts(
            preference, slot, _rank_within_group(slot), token_used, room, expert_to_bin
        )
        bin_of = expert_to_bin[expert]
        # Choices per bin so far, in serial order (items without a choice join no bin's count).
        earlier_in_bin = _rank_within_group(torch.where(has_choice, bin_of, num_bins))
        bad = has_choice & (earlier_in_bin >= room[bin_of])
        positions = torch.arange(head.shape[0], device=device)
        cut = int(torch.where(bad, positions, head.shape[0]).min())
        commit = has_choice & (positions < cut)
        committed = commit.nonzero().squeeze(1)
        choice[head[committed]] = expert[committed]
        room -= torch.bincount(bin_of[committed], minlength=num_bins)
        token_used[slot[committed], expert[committed]] = True
        # Items without any free expert now never find one later (room and choice only shrink).
        pending = torch.cat([head[~commit & has_choice], rest])
        window = max(_MIN_WINDOW, 2 * cut) if cut < head.shape[0] else 2 * window
    return choice


def propose_experts(
    preference: torch.Tensor,
    slot: torch.Tensor,
    rank_in_token: torch.Tensor,
    token_used: torch.Tensor,
    room: torch.Tensor,
    expert_to_bin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round's proposals: each pending item's (rank_in_token)-th free expert.

    Args:
        preference: [U, E] every token's experts, best score first.
        slot: [P] each pending item's token (a row of preference and token_used);
        rank_in_token: [P] pending items of the same token before this one.
        token_used: [U, E] bool, experts each token uses; room: [B]; expert_to_bin: [E].

    Returns:
        (expert [P] int64, has_choice [P] bool).

    Most items find their expert among their token's first few preferences, so those are
    searched first and only the items that find none there search the whole row.
    """
    free_expert = room[expert_to_bin] > 0
    head = preference[:, : min(_FIRST_PREFERENCES, preference.shape[1])]
    expert, has_choice = _nth_free(head, slot, rank_in_token, token_used, free_expert)
    if head.shape[1] < preference.shape[1]:
        retry = (~has_choice).nonzero().squeeze(1)
        expert[retry], has_choice[retry] = _nth_free(
            preference, slot[retry], rank_in_token[retry], token_used, free_expert
        )
    return expert, has_choice


def _nth_free(
    preference: torch.Tensor,
    slot: torch.Tensor,
    rank_in_token: torch.Tensor,
    token_used: torch.Tensor,
    free_expert: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's (rank_in_token)-th expert in its preference row with room and not yet used."""
    ranked = preference[slot]
    used = token_used.view(-1)[slot.unsqueeze(1) * token_used.shape[1] + ranked]
    free = free_expert[ranked] & ~used
    running = free.long().cumsum(1)
    has_choice = running[:, -1] > rank_in_token
    position = (running <= rank_in_token.unsqueeze(1)).sum(1).clamp_max(ranked.shape[1] - 1)
    return torch.gather(ranked, 1, position.unsqueeze(1)).squeeze(1), has_choice


def _rank_within_group(group_ids: torch.Tensor) -> torch.Tensor:
    """[P] -> [P]: how many earlier entries share each entry's id (0 for the first)."""
    order = torch.argsort(group_ids, stable=True)
    sorted_ids = group_ids[order]
    positions = torch.arange(group_ids.shape[0], device=group_ids.device)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    first = torch.cummax(torch.where(starts, positions, 0), 0).values
    ranks = torch.empty_like(positions)
    ranks[order] = positions - first
    return ranks


# -------------------------------------------------------------------------------- validation


def _check_inputs(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    topk: Optional[int],
    validate: bool,
) -> tuple[int, int, int]:
    if not isinstance(scores, torch.Tensor) or not isinstance(routing_map, torch.Tensor):
        raise TypeError("scores and routing_map must be torch.Tensor")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_tokens, num_experts], got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if routing_map.shape != scores.shape:
        raise ValueError(
            f"routing_map shape {tuple(routing_map.shape)} must equal scores shape "
            f"{tuple(scores.shape)}"
        )
    if routing_map.dtype != torch.bool:
        raise TypeError(f"routing_map must be torch.bool, got {routing_map.dtype}")
    if routing_map.device != scores.device:
        raise ValueError(f"routing_map is on {routing_map.device}, scores on {scores.device}")
    if probs is not None:
        if probs.shape != scores.shape or probs.device != scores.device:
            raise ValueError(
                f"probs must match scores in shape and device, got {tuple(probs.shape)} on "
                f"{probs.device}"
            )
        if not probs.is_floating_point():
            raise TypeError(f"probs must be floating point, got {probs.dtype}")
    num_tokens, num_experts = scores.shape
    if num_experts < 1:
        raise ValueError("scores must have at least one expert column")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)):
        raise TypeError(f"topk must be an int, got {topk!r}")
    if topk is not None and not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
    if validate and num_tokens > 0:
        for name, values in (("scores", scores), ("probs", probs)):
            if values is not None and not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name} must be finite; they contain NaN or +-inf")
        per_token = routing_map.sum(1)
        lo, hi = int(per_token.min()), int(per_token.max())
        if lo != hi or lo == 0 or (topk is not None and lo != topk):
            expected = f"exactly topk={topk}" if topk is not None else "the same number (>= 1) of"
            raise ValueError(
                f"routing_map must select {expected} experts per token; rows select {lo}..{hi}"
            )
        topk = lo
    if topk is None:
        topk = int(routing_map[0].sum()) if num_tokens > 0 else 1
    return num_tokens, num_experts, topk


def _as_capacity_config(cfg: Any) -> CapacityConfig:
    if isinstance(cfg, CapacityConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return CapacityConfig.from_dict(cfg)
    raise TypeError(f"cfg must be a CapacityConfig or a mapping of its fields, got {type(cfg).__name__}")


def _check_group(cfg: CapacityConfig, group: Optional[RoutingGroup]) -> Optional[RoutingGroup]:
    """The group whose tokens share one plan: only scope global uses one, of two or more ranks."""
    if group is not None and not isinstance(group, RoutingGroup):
        raise TypeError(f"group must be a RoutingGroup, got {type(group).__name__}")
    if cfg.scope != "global" or group is None or group.world_size == 1:
        return None
    return group


def _as_index_tensor(name: str, value: ExpertSet, device: torch.device) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(list(value), dtype=torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.dim() != 1:
        raise TypeError(f"{name} must be a 1-D sequence of integer indices")
    return tensor.to(device=device, dtype=torch.int64)


def _bins(
    cfg: CapacityConfig,
    expert_to_rank: Optional[ExpertSet],
    num_experts: int,
    device: torch.device,
) -> _Bins:
    if cfg.scope != "device":
        return _Bins(torch.arange(num_experts, device=device), num_experts, 1)
    if expert_to_rank is None:
        raise ValueError("scope='device' needs expert_to_rank ([num_experts] EP rank of each expert)")
    # Checked on the host: no device syncs per plan (the mapping is a few hundred entries).
    mapping = _as_index_tensor("expert_to_rank", expert_to_rank, torch.device("cpu"))
    if mapping.numel() != num_experts:
        raise ValueError(
            f"expert_to_rank has {mapping.numel()} entries, expected num_experts={num_experts}"
        )
    num_ranks = int(mapping.max()) + 1
    per_rank = torch.bincount(mapping.clamp_min(0), minlength=num_ranks)
    if int(mapping.min()) < 0 or bool((per_rank != per_rank[0]).any()):
        raise ValueError(
            "expert_to_rank must give every EP rank 0..R-1 the same number of experts, "
            f"got counts {per_rank.tolist()}"
        )
    return _Bins(mapping.to(device), num_ranks, num_experts // num_ranks)


def _local_mask(
    cfg: CapacityConfig,
    local_experts: Optional[ExpertSet],
    num_tokens: int,
    num_experts: int,
    device: torch.device,
    validate: bool,
) -> torch.Tensor:
    """[E] or [T, E] bool: the experts on each token's own device (policy expanded)."""
    if cfg.policy != "expanded":
        return torch.zeros(num_experts, dtype=torch.bool, device=device)
    if local_experts is None:
        raise ValueError("policy='expanded' needs local_experts (the experts hosted on this rank)")
    if isinstance(local_experts, torch.Tensor) and local_experts.dtype == torch.bool:
        if local_experts.shape not in ((num_experts,), (num_tokens, num_experts)):
            raise ValueError(
                f"a local_experts mask must be [{num_experts}] or [{num_tokens}, {num_experts}], "
                f"got {tuple(local_experts.shape)}"
            )
        return local_experts.to(device)
    index = _as_index_tensor("local_experts", local_experts, torch.device("cpu"))
    if validate and index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_experts):
        raise ValueError(f"local_experts must lie in [0, {num_experts}), got {index.tolist()}")
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[index] = True
    return mask.to(device)
