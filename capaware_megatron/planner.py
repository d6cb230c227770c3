"""plan_routing: the capacity-aware routing plan, orchestrated over one backend's ops.

Notation: T tokens on this rank, E experts, k experts per token (the router's top-k), B capacity
bins (an expert each for scopes local/global, an expert-parallel rank each for scope device), m
experts per bin, C a bin's capacity, W ranks in the group (global scope).

Pipeline (each step an op of the backend: capaware_megatron.ops, the torch twins, or the Triton
kernels in capaware_megatron.kernels, which share the interface):
    collect_candidates  priority keys of the candidates; the plan as if nothing overflowed
    bin_thresholds      [B] the C-th largest key of each bin (global: bin_top_keys + one
                        gather, or bin_items + ops.kth_largest over the group)
    drop_below          clears candidates below their bin's threshold
    reroute             (ops.reroute, device ops for both backends) the overflow moves to
                        experts with room in CapacityConfig.reroute_rounds rounds

Keys are unique, so a threshold keeps exactly the top-C candidates of a bin and a distributed
caller needs only the per-bin top-C keys of every rank to reproduce the single-process plan.

Host synchronization: none with an ExpertLayout (or none needed), ``validate=False`` and a given
``topk``, for every policy, priority and scope; output shapes depend only on (T, E, k, C, W).
Global scope: when the group says every rank plans the same number of tokens
(``RoutingGroup.tokens_per_rank``, CUDA-graph decode) C is a host int and each bin's group-wide
threshold comes from one [B, C] gather; otherwise the ranks' token counts are exchanged as a
[W, 3] tensor that stays on the device, C is a 0-dim tensor, and the thresholds come from one
[B, C_max] gather of every rank's top keys when CapacityConfig.max_tokens_per_rank bounds C on
the host (C_max), else from a radix select over the group (ops.kth_largest: 8 gathers of
[B, 256] digit counts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Optional, Union

import torch

from . import ops as torch_ops
from .config import GATHERED_TOP_KEYS_MAX, TRITON_MAX_EXPERTS, CapacityConfig, Count, expert_capacity
from .group import RoutingGroup
from .layout import Bins, ExpertLayout, ExpertSet

CapacityFn = Callable[[Count, Count, int, float, int], Count]

__all__ = ["ExpertLayout", "RoutingPlan", "plan_routing"]


@dataclass
class RoutingPlan:
    """What reaches each expert after the capacity plan.

    Attributes:
        routing_map: [T, E] bool, kept and rerouted assignments.
        probs: [T, E] combine weights, 0 exactly where routing_map is False.
        capacity: C of one bin (an expert; an EP rank for scope "device"). T (or the group's token
            count) when nothing is capped: dropless, decode guard or training. A 0-dim int64
            tensor for scope global when the group's token counts stay on the device (eager,
            no RoutingGroup.tokens_per_rank); an int otherwise.
        tokens_per_expert_before: [E] int64, assignments per expert in the router's map.
        tokens_per_expert_after: [E] int64, assignments per expert in the plan.
        num_dropped: 0-dim int64, router assignments that lost their expert and found no other.
        num_rerouted: 0-dim int64, plan assignments outside the router's map (reroute, expanded).
        capacity_bound: a host int no smaller than capacity (capacity itself when that is an
            int; with it on the device, its bound from the rows or the ranks' token bound), what
            a caller with static shapes sizes buffers by; None when no bound is known.
        capacity_floor: the floor C was held to (min_capacity per bin: the calibrated knee
            with min_capacity "auto"); 0 when nothing is capped.
    """

    routing_map: torch.Tensor
    probs: torch.Tensor
    capacity: Count
    tokens_per_expert_before: torch.Tensor
    tokens_per_expert_after: torch.Tensor
    num_dropped: torch.Tensor
    num_rerouted: torch.Tensor
    capacity_bound: Optional[int] = None
    capacity_floor: int = 0


def plan_routing(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    cfg: Union[CapacityConfig, Mapping[str, Any]],
    *,
    layout: Optional[ExpertLayout] = None,
    local_experts: Optional[ExpertSet] = None,
    expert_to_rank: Optional[ExpertSet] = None,
    probs: Optional[torch.Tensor] = None,
    topk: Optional[int] = None,
    group: Optional[RoutingGroup] = None,
    training: bool = False,
    validate: bool = True,
    capacity_fn: CapacityFn = expert_capacity,
    token_mask: Optional[torch.Tensor] = None,
    eligible: Optional[torch.Tensor] = None,
) -> RoutingPlan:
    """Cap every expert's (or EP rank's) load and decide what is kept, dropped or moved.

    Args:
        scores: [T, E] full router probabilities (softmax over all experts), fp32/bf16/fp16.
        routing_map: [T, E] bool, the router's top-k choice.
        cfg: the capacity configuration, or a mapping of its fields (unknown keys are refused).
        layout: the layer's experts (ExpertLayout.build, once per layer): scope device and
            policy expanded read it; no host work per plan.
        local_experts: instead of a layout, the experts hosted on this rank (indices or a [E] bool
            mask, checked on the host per call), or a [T, E] bool mask of each token's own
            device's experts (used as given); policy expanded.
        expert_to_rank: instead of a layout, [E] EP rank of each expert (checked per call); scope
            device.
        probs: [T, E] the router's combine weights for routing_map (default scores * routing_map);
            kept assignments keep them, rerouted ones take ``scores``.
        topk: k; inferred from routing_map (a host sync) when None.
        group: the ranks a global-scope plan spans; None is a group of one.
        training: the module's mode; capacity applies in training only with apply_in_training.
        validate: check values too (scores and probs finite, uniform k, index ranges): the
            boundary check, which syncs with the host; shape, dtype and type checks always run.
        capacity_fn: C from (tokens, k, bins, gamma, min_capacity); default Megatron-Core's
            formula (``expert_capacity``), the DeepSpeed gate passes DeepSpeed's float32 one.
        token_mask: [T] bool, the real tokens (None: all). Others (an inference batch padded to
            a CUDA graph's size) take no capacity: they count for no expert, weigh 0 and hold
            no slot, and T is the real tokens' count, on the device, so C is too; shapes stay
            static and C's bound from the T rows sizes the thresholds. Real tokens keep their
            row index in the priority keys: with the padding after them (Megatron's), the plan
            of the real tokens is the plan of the same tokens unpadded.
        eligible: [T, E] bool, the experts each token may be moved to (reroute) or compete for
            (expanded) beyond its picks (None: all): a router's own limit on where a token's
            experts may be, DeepSeek-V3's group-limited routing among them. Picks are always
            eligible.

    Returns:
        RoutingPlan.
    """
    cfg = _as_capacity_config(cfg)
    if not isinstance(cfg.min_capacity, int):
        raise ValueError(
            f"min_capacity={cfg.min_capacity!r} names a calibration; resolve it to the layer's knee "
            "first (capaware_megatron.calibrate.resolve_min_capacity; the Megatron dispatcher "
            "and the DeepSpeed gate do so when they are built)")
    num_tokens, num_experts, topk = _check_inputs(scores, routing_map, probs, topk, validate)
    if eligible is not None and (eligible.shape != scores.shape or eligible.dtype != torch.bool
                                 or eligible.device != scores.device):
        raise ValueError(f"eligible must be a [T, E] bool mask like scores ({tuple(scores.shape)} on "
                         f"{scores.device}), got {tuple(eligible.shape)} {eligible.dtype} on {eligible.device}")
    if token_mask is not None:
        routing_map, probs = _without_padding(token_mask, routing_map, probs, scores)
    tokens_before = routing_map.sum(0, dtype=torch.int64)
    layout = _layout(layout, expert_to_rank, local_experts, num_experts, cfg, scores.device)

    global_group = _check_group(cfg, group)
    bins = Bins.for_scope(cfg.scope, layout, num_experts, scores.device)
    local_mask = _local_mask(cfg, layout, local_experts, num_tokens, num_experts)

    if validate and cfg.max_tokens_per_rank is not None and global_group is None:
        _check_token_bound(cfg.max_tokens_per_rank, torch.tensor([num_tokens]))
    token_offset, group_tokens, group_topk = 0, num_tokens, topk
    if token_mask is not None:
        group_tokens = token_mask.sum(dtype=torch.int64)
    if global_group is not None:
        token_offset, group_tokens, group_topk = _group_layout(
            global_group, num_tokens, topk, scores.device, cfg.max_tokens_per_rank, validate, token_mask)
    # The token count on the device (eager global scope, or real tokens among padding): C and
    # the guard stay there too.
    counted_on_device = isinstance(group_tokens, torch.Tensor)

    router_weights = _router_weights(probs, scores, routing_map)
    uncapped = group_tokens * bins.experts_per_bin  # the capacity a plan reports when nothing is capped

    # Decode guard: a step whose mean load is below min_capacity is never capped. Among padding
    # it counts the step's rows, a host count, so that the shapes a static caller sizes by the
    # plan hold; eager global scope decides it on the device.
    guard_load = group_tokens * group_topk
    if token_mask is not None and (global_group is None or global_group.tokens_per_rank is not None):
        guard_load = num_tokens * (1 if global_group is None else global_group.world_size) * topk
    below_guard = guard_load < cfg.min_capacity * num_experts
    guarded_on_device = isinstance(below_guard, torch.Tensor)
    if not cfg.caps(training) or (not guarded_on_device and below_guard) or (
            not counted_on_device and group_tokens == 0):
        return _identity_plan(routing_map, router_weights, uncapped, tokens_before)

    capacity = capacity_fn(
        group_tokens,
        group_topk,
        bins.num_bins,
        cfg.capacity_factor,
        cfg.min_capacity * bins.experts_per_bin,
    )
    # The most C can be, as a host int: C itself, or with C on the device its bound from the
    # rows and the ranks' token bound (None: unbounded, or too large for the gather to pay).
    capacity_slots = capacity if not counted_on_device else _bounded_capacity(
        cfg, global_group, num_tokens, topk, bins, capacity_fn)
    candidates = routing_map
    if cfg.policy == "expanded":
        others = local_mask if token_mask is None else local_mask & token_mask.unsqueeze(1)
        candidates = routing_map | (others if eligible is None else others & eligible)
    ops = _ops_for(cfg.backend, scores)
    state, keep, weights = ops.collect_candidates(
        scores, candidates, routing_map, probs, cfg.priority, cfg.seed, token_offset,
        _max_candidates(cfg, topk, layout, local_mask),
    )
    if global_group is None and not counted_on_device:
        thresholds = ops.bin_thresholds(state, bins.experts, capacity)
    elif global_group is None:  # the Triton select writes a bin's top keys unordered: top_keys sorts
        top = torch_ops.top_keys(ops.bin_top_keys(state, bins.experts, capacity_slots), capacity_slots)
        thresholds = torch_ops.kth_of_top(top, capacity)
    elif capacity_slots is None:
        keys, key_bins = ops.bin_items(state, bins.expert_to_bin)
        thresholds = torch_ops.kth_largest(
            keys, key_bins, bins.num_bins, capacity.expand(bins.num_bins), global_group)
    else:
        top = torch_ops.group_top_keys(ops.bin_top_keys(state, bins.experts, capacity_slots), global_group)
        thresholds = torch_ops.kth_of_top(top, capacity)
    new_map, new_probs, tokens_after = ops.drop_below(state, thresholds, bins.expert_to_bin, keep, weights)
    if cfg.policy == "expanded":
        num_rerouted = (new_map & ~routing_map).sum(dtype=torch.int64)
        num_dropped = (routing_map & ~new_map).sum(dtype=torch.int64)
    else:  # the candidates are the router's picks: what is not kept is dropped, unless rerouted
        num_dropped = tokens_before.sum() - tokens_after.sum()
        num_rerouted = torch.zeros_like(num_dropped)
    if cfg.policy == "reroute":
        carried = router_weights if cfg.reroute_weight == "carry" else None
        placed = torch_ops.reroute(
            scores, routing_map, new_map, new_probs, tokens_after, bins, capacity,
            cfg.reroute_rounds, cfg.priority, topk, cfg.seed, token_offset, global_group, carried,
            picks=state if ops is torch_ops else None,  # the torch backend listed the picks already
            capacity_slots=capacity_slots, eligible=eligible,
        )
        new_map, new_probs, tokens_after = placed.routing_map, placed.weights, placed.tokens_per_expert
        num_rerouted = placed.num_rerouted
        num_dropped = num_dropped - num_rerouted
    if ops is not torch_ops and _needs_grad(scores, probs):
        # Kernels write the weights outside autograd: take the same values through torch ops so
        # the router's gradient flows through the plan's combine weights (kept router picks: its
        # weights; rerouted: the reroute's own, torch ops already; expanded: the score).
        others = new_probs if cfg.policy == "reroute" else scores
        new_probs = torch.where(
            new_map, torch.where(routing_map, router_weights, others.to(router_weights.dtype)), 0)
    if cfg.renormalize:
        new_probs = _renormalize(new_probs, router_weights)
    plan = RoutingPlan(
        routing_map=new_map,
        probs=new_probs,
        capacity=capacity,
        tokens_per_expert_before=tokens_before,
        tokens_per_expert_after=tokens_after,
        num_dropped=num_dropped,
        num_rerouted=num_rerouted,
        capacity_bound=capacity_slots,
        capacity_floor=cfg.min_capacity * bins.experts_per_bin,
    )
    if guarded_on_device:  # the identity plan where the guard holds
        identity = _identity_plan(routing_map, router_weights, uncapped, tokens_before)
        plan = _where(below_guard, identity, plan)
    return plan


def _router_weights(
    probs: Optional[torch.Tensor], scores: torch.Tensor, routing_map: torch.Tensor
) -> torch.Tensor:
    """The router's combine weights: probs, or the scores of its picks when none are given."""
    return scores * routing_map if probs is None else probs


def _needs_grad(scores: torch.Tensor, probs: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        scores.requires_grad or (probs is not None and probs.requires_grad)
    )


def _group_layout(
    group: RoutingGroup,
    num_tokens: int,
    topk: int,
    device: torch.device,
    max_tokens_per_rank: Optional[int] = None,
    validate: bool = False,
    token_mask: Optional[torch.Tensor] = None,
) -> tuple[Count, Count, Count]:
    """(this rank's first token index, the group's token count, the group's k).

    Ranks that plan a static, equal number of tokens (``tokens_per_rank``) and no padding
    exchange nothing and get host ints. Otherwise one fixed [W, 3] gather, kept on the device as
    0-dim tensors: C follows from them there and nothing waits for the host. Each rank's tokens
    take the key indices up to its last real row (its span: all rows without a mask), its real
    tokens count for C. A rank without tokens cannot infer k, so k comes from the ranks that
    have tokens; ranks that disagree trip a device assert. With a token bound every rank checks
    every rank's count against it (validate: on the host, so all raise the same error; else a
    device assert).
    """
    if group.tokens_per_rank is not None and num_tokens != group.tokens_per_rank:
        raise ValueError(
            f"the group plans {group.tokens_per_rank} tokens per rank (tokens_per_rank), "
            f"this rank has {num_tokens}"
        )
    if group.tokens_per_rank is not None and token_mask is None:
        return group.rank * num_tokens, group.world_size * num_tokens, topk
    if token_mask is None:
        span = real = torch.full((), num_tokens, dtype=torch.int64, device=device)
    else:
        real = token_mask.sum(dtype=torch.int64)
        rows = torch.arange(1, num_tokens + 1, device=device)
        span = torch.where(token_mask, rows, 0).amax() if num_tokens else real
    mine = torch.stack([span, real, torch.where(real > 0, topk, 0)])
    layout = group.all_gather(mine)  # [W, 3]: span, real tokens and k of every rank
    spans, counts, ks = layout[:, 0], layout[:, 1], layout[:, 2]
    if max_tokens_per_rank is not None:
        if validate:
            _check_token_bound(max_tokens_per_rank, counts)
        else:
            torch._assert_async((counts <= max_tokens_per_rank).all(),
                                "a rank plans more tokens than CapacityConfig.max_tokens_per_rank")
    group_topk = ks.amax()
    torch._assert_async(
        ((ks == group_topk) | (ks == 0)).all(), "ranks of the group route with different top-k"
    )
    group_topk = torch.where(group_topk > 0, group_topk, topk)
    return spans[: group.rank].sum(), counts.sum(), group_topk


def _without_padding(
    token_mask: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor], scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing_map, probs) with the rows token_mask leaves out routed nowhere, weight 0."""
    if token_mask.dtype != torch.bool or token_mask.shape != routing_map.shape[:1]:
        raise ValueError(
            f"token_mask must be [{routing_map.shape[0]}] bool (True: a real token), got "
            f"{tuple(token_mask.shape)} {token_mask.dtype}"
        )
    real = token_mask.unsqueeze(1)
    return routing_map & real, _router_weights(probs, scores, routing_map).masked_fill(~real, 0)


def _check_token_bound(max_tokens_per_rank: int, counts: torch.Tensor) -> None:
    """counts [W]: every rank's token count, read on the host (the boundary check)."""
    over = [(rank, count) for rank, count in enumerate(counts.tolist()) if count > max_tokens_per_rank]
    if over:
        ranks = ", ".join(f"rank {rank}: {count}" for rank, count in over)
        raise ValueError(
            f"CapacityConfig.max_tokens_per_rank={max_tokens_per_rank} is smaller than the tokens "
            f"a rank plans ({ranks}); raise the bound to the most tokens one rank sees in a step, "
            "or leave it None"
        )


def _bounded_capacity(
    cfg: CapacityConfig,
    group: Optional[RoutingGroup],
    num_tokens: int,
    topk: int,
    bins: Bins,
    capacity_fn: CapacityFn,
) -> Optional[int]:
    """C_max, a host int no smaller than C: the capacity of this rank's T rows (alone), of W
    ranks at tokens_per_rank or at max_tokens_per_rank. Over a group, None where none is known
    or the [B, C_max] top-keys gather it sizes would move more bytes than the radix select."""
    if group is None:
        most = num_tokens
    elif group.tokens_per_rank is not None or cfg.max_tokens_per_rank is not None:
        per_rank = group.tokens_per_rank if group.tokens_per_rank is not None else cfg.max_tokens_per_rank
        most = group.world_size * per_rank
    else:
        return None
    bound = capacity_fn(most, topk, bins.num_bins, cfg.capacity_factor, cfg.min_capacity * bins.experts_per_bin)
    return bound if group is None or bound <= GATHERED_TOP_KEYS_MAX else None


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
        capacity_bound=capacity if isinstance(capacity, int) else None,
    )


def _where(condition: torch.Tensor, chosen: RoutingPlan, otherwise: RoutingPlan) -> RoutingPlan:
    """The plan `chosen` where the 0-dim bool `condition` holds, else `otherwise`, tensor field
    by field on the device; no capacity bound holds for both, and the floor is 0."""
    return RoutingPlan(*(
        torch.where(condition, getattr(chosen, name), getattr(otherwise, name))
        for name in RoutingPlan.__dataclass_fields__ if name not in ("capacity_bound", "capacity_floor")
    ))


def _renormalize(new_probs: torch.Tensor, old_probs: torch.Tensor) -> torch.Tensor:
    """Scale each token's kept weights so they sum to what its router weights summed to."""
    old_sum = old_probs.float().sum(1, keepdim=True)
    new_sum = new_probs.float().sum(1, keepdim=True)
    scale = torch.where(new_sum > 0, old_sum / new_sum.clamp_min(torch.finfo(torch.float32).tiny), 0)
    return (new_probs.float() * scale).to(new_probs.dtype)


def _ops_for(backend: str, scores: torch.Tensor) -> ModuleType:
    """The module computing the plan's steps: the torch twins or the Triton kernels."""
    triton_fits = scores.shape[1] <= TRITON_MAX_EXPERTS
    if backend == "torch" or (backend == "auto" and not (scores.is_cuda and triton_fits)):
        return torch_ops
    try:
        from . import kernels
    except ImportError as err:
        if backend == "auto":
            return torch_ops
        raise ImportError(f"backend='triton' is unavailable: {err}") from err
    if not scores.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (scores are on {scores.device}); "
            "on CPU use backend='torch' or 'auto', or TRITON_INTERPRET=1 for the interpreter"
        )
    return kernels


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


def _layout(
    layout: Optional[ExpertLayout],
    expert_to_rank: Optional[ExpertSet],
    local_experts: Optional[ExpertSet],
    num_experts: int,
    cfg: CapacityConfig,
    device: torch.device,
) -> Optional[ExpertLayout]:
    """The layout on the scores' device: the one given, or one built (and checked) per call."""
    per_token = isinstance(local_experts, torch.Tensor) and local_experts.dim() == 2
    if layout is not None:
        if not isinstance(layout, ExpertLayout):
            raise TypeError(f"layout must be an ExpertLayout, got {type(layout).__name__}")
        if expert_to_rank is not None or (local_experts is not None and not per_token):
            raise ValueError("pass either layout or expert_to_rank / local_experts, not both")
        if layout.num_experts != num_experts:
            raise ValueError(f"layout has {layout.num_experts} experts, scores {num_experts}")
        return layout.to(device)
    needs_ranks = cfg.scope == "device"
    needs_local = cfg.policy == "expanded" and not per_token
    if not (needs_ranks or needs_local):
        return None
    if needs_ranks and expert_to_rank is None:
        raise ValueError("scope='device' needs expert_to_rank ([num_experts] EP rank of each expert)")
    if needs_local and local_experts is None:
        raise ValueError("policy='expanded' needs local_experts (the experts hosted on this rank)")
    return ExpertLayout.build(
        num_experts, expert_to_rank if needs_ranks else None, local_experts if needs_local else None
    ).to(device)


def _max_candidates(
    cfg: CapacityConfig, topk: int, layout: Optional[ExpertLayout], local_mask: Optional[torch.Tensor]
) -> Optional[int]:
    """The most candidates a token has: its k picks, plus its device's experts for expanded
    drop (known from the layout; a per-token mask gives no bound: None)."""
    if cfg.policy != "expanded":
        return topk
    if local_mask is not None and local_mask.dim() == 1:
        return topk + layout.num_local
    return None


def _local_mask(
    cfg: CapacityConfig,
    layout: Optional[ExpertLayout],
    local_experts: Optional[ExpertSet],
    num_tokens: int,
    num_experts: int,
) -> Optional[torch.Tensor]:
    """[E] or [T, E] bool: the experts on each token's own device (policy expanded)."""
    if cfg.policy != "expanded":
        return None
    if isinstance(local_experts, torch.Tensor) and local_experts.dim() == 2:
        if local_experts.dtype != torch.bool or local_experts.shape != (num_tokens, num_experts):
            raise ValueError(
                f"a per-token local_experts mask must be [{num_tokens}, {num_experts}] bool, "
                f"got {tuple(local_experts.shape)} {local_experts.dtype}"
            )
        return local_experts
    if layout is None or layout.local_experts is None:
        raise ValueError("policy='expanded' needs local_experts (the experts hosted on this rank)")
    return layout.local_experts
