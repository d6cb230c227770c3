"""A deliberately simple planner: Python loops over tokens and experts, no shared code.

It restates DESIGN.md's semantics with tuples for priorities, sorted lists for capacity and a
literal serial loop for rerouting, so that the vectorised planners are checked against an
implementation that is easy to read and hard to get wrong in the same way.
"""

from __future__ import annotations

import math

import torch


def lowbias32(x: int) -> int:
    mask = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    return x ^ (x >> 16)


def priority(kind: str, score: float, token: int, expert: int, num_experts: int, seed: int):
    """Larger is kept first; ties go to the earlier token, then the lower expert."""
    tie = (-token, -expert)
    if kind == "score":
        return (score, *tie)
    if kind == "position":
        return tie
    if kind == "reverse":
        return (token, -expert)
    if kind == "random":
        salt = (seed * 0x9E3779B9) & 0xFFFFFFFF
        return (lowbias32((token * num_experts + expert) ^ salt), *tie)
    raise AssertionError(kind)


def _preferences(t, score, used, room, bin_of, num_experts):
    """Token t's experts it does not use whose bin has room, best score first (ties: lower index)."""
    free = [e for e in range(num_experts) if e not in used[t] and room[bin_of[e]] > 0]
    return sorted(free, key=lambda e: (-score[t][e], e))


def _serial_greedy(overflow, prio, score, used, room, bin_of, num_experts, rounds):
    """Each overflow assignment, highest priority first, takes its token's best expert with room.
    Returns {(token, new expert): the expert it came from}."""
    placed = {}
    for t, e in sorted(overflow, key=lambda a: prio(*a), reverse=True):
        free = _preferences(t, score, used, room, bin_of, num_experts)
        if free:
            used[t].add(free[0])
            room[bin_of[free[0]]] -= 1
            placed[(t, free[0])] = e
    return placed


def _proposal_rounds(overflow, prio, score, used, room, bin_of, num_experts, rounds):
    """`rounds` rounds: a token's j-th pending assignment (by priority) proposes its j-th expert
    with room at the round's start; each bin accepts its highest-priority proposals up to room."""
    pending, origin = {}, {}
    for t, e in overflow:
        pending.setdefault(t, []).append(prio(t, e))
        origin[(t, prio(t, e))] = e
    placed = {}
    for _ in range(rounds):
        start = list(room)
        proposals = []  # (item key, token, expert)
        for t, items in pending.items():
            items.sort(reverse=True)
            free = _preferences(t, score, used, start, bin_of, num_experts)
            proposals += [(key, t, e) for key, e in zip(items, free)]
        for b in range(len(room)):
            in_bin = sorted((p for p in proposals if bin_of[p[2]] == b), reverse=True)
            for key, t, e in in_bin[: max(start[b], 0)]:
                used[t].add(e)
                room[b] -= 1
                placed[(t, e)] = origin[(t, key)]
                pending[t].remove(key)
    return placed


def reference_plan(
    scores: torch.Tensor,
    routing_map: torch.Tensor,
    cfg,
    local_experts=(),
    expert_to_rank=None,
    probs=None,
    training: bool = False,
    exact_reroute: bool = False,
    eligible=None,
):
    """Returns (routing_map [T, E] bool, probs [T, E], capacity).

    Reroute: cfg.reroute_rounds rounds of proposals (the planner's semantics), or with
    exact_reroute the serial greedy (the yardstick the bounded rounds are measured against).
    eligible: [T, E] bool, the experts a token may move to or compete for beyond its picks.
    """
    num_tokens, num_experts = scores.shape
    score = scores.float().tolist()
    chosen = [set(torch.nonzero(row).flatten().tolist()) for row in routing_map]
    topk = len(chosen[0]) if num_tokens else 1
    if probs is None:
        probs = scores * routing_map
    if cfg.scope == "device":
        bin_of = [int(r) for r in expert_to_rank]
    else:
        bin_of = list(range(num_experts))
    num_bins = max(bin_of) + 1
    per_bin = num_experts // num_bins
    capped = cfg.policy != "none" and cfg.capacity_factor is not None
    capped = capped and (cfg.apply_in_training or not training)
    if not capped or num_tokens * topk < cfg.min_capacity * num_experts or num_tokens == 0:
        return routing_map.clone(), probs * routing_map, num_tokens * per_bin
    capacity = max(
        math.ceil((num_tokens * topk / num_bins) * cfg.capacity_factor), cfg.min_capacity * per_bin
    )

    if isinstance(local_experts, torch.Tensor):  # [T, E]: each token's own device
        local = [set(torch.nonzero(row).flatten().tolist()) for row in local_experts]
    else:
        local = [set(local_experts)] * num_tokens
    if cfg.policy != "expanded":
        local = [set()] * num_tokens
    barred = [set() for _ in range(num_tokens)]
    if eligible is not None:
        barred = [set(torch.nonzero(~row).flatten().tolist()) - chosen[t] for t, row in enumerate(eligible)]
        local = [local[t] - barred[t] for t in range(num_tokens)]
    candidates = [
        (t, e)
        for t in range(num_tokens)
        for e in range(num_experts)
        if e in chosen[t] or e in local[t]
    ]

    def prio(t, e):
        return priority(cfg.priority, score[t][e], t, e, num_experts, cfg.seed)

    kept = set()
    for b in range(num_bins):
        in_bin = sorted((a for a in candidates if bin_of[a[1]] == b), key=lambda a: prio(*a))
        kept.update(in_bin[::-1][:capacity])

    rerouted = {}  # (token, new expert) -> the expert the assignment came from
    if cfg.policy == "reroute":
        room = [capacity - sum(1 for (_, e) in kept if bin_of[e] == b) for b in range(num_bins)]
        overflow = [a for a in candidates if a not in kept]
        used = [chosen[t] | barred[t] for t in range(num_tokens)]
        place = _serial_greedy if exact_reroute else _proposal_rounds
        rerouted = place(overflow, prio, score, used, room, bin_of, num_experts, cfg.reroute_rounds)

    new_map = torch.zeros_like(routing_map)
    new_probs = torch.zeros_like(probs)
    for t, e in kept | set(rerouted):
        new_map[t, e] = True
        if e in chosen[t]:
            new_probs[t, e] = probs[t, e]
        elif (t, e) in rerouted and getattr(cfg, "reroute_weight", "score") == "carry":
            new_probs[t, e] = probs[t, rerouted[(t, e)]]
        else:
            new_probs[t, e] = scores[t, e].to(probs.dtype)
    if cfg.renormalize:
        for t in range(num_tokens):
            total = float(new_probs[t].float().sum())
            if total > 0:
                new_probs[t] = (new_probs[t].float() * float(probs[t].float().sum()) / total).to(
                    probs.dtype
                )
    return new_map, new_probs, capacity
