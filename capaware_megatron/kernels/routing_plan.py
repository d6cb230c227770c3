"""Triton kernels for the routing plan: the plan in one pass over the scores, then capacity.

Same results as the torch planner, bit for bit: the keys are the ones capaware_megatron.priority
defines, and a threshold is the exact C-th largest key of a bin, so `keep = key >= threshold`
needs no sort and no tie handling. Memory traffic is one read of the router's [T, E] tensors and
one write of the plan; capacity then touches only the routed assignments (8 B each), and only
those of over-full bins.

    K1 _collect_kernel  scores [T, E] fp32/bf16/fp16, candidates [T, E] bool, routing_map, probs
                        (any strides) -> the plan as if nothing overflowed: keep [T, E] bool (the
                        candidates), weights [T, E] (router weight, or score for candidates the
                        router did not pick); and every candidate's key appended to its expert's
                        list: lists [E, T] int64, counts [E] int32 (row e holds counts[e] keys, in
                        no particular order: keys are unique). One atomic per column block.
                        grid (cdiv(T, BLOCK_T),); each program loops over E in BLOCK_E columns.
    K2 _select_kernel   lists, counts, bin_experts [B, m] -> thresholds [B] int64: the capacity-th
                        largest key of the bin's lists, NOT_ROUTED when it has fewer. Optionally
                        (global scope) the keys at or above it -> top [B, C]. grid (B,). A bin
                        below capacity reads nothing else; one above it runs a radix select on
                        the key's unsigned bit pattern, 8-bit digits from the top (a 256-bucket
                        tl.histogram per block): 8 passes over its ~T*k/E list entries
                        (L2-resident after the first).
    K3 _drop_kernel     lists, thresholds -> clears keep/weights of the keys below their bin's
                        threshold, kept counts [E] int64, and (reroute) the dropped keys.
                        grid (E,); an expert of a bin below capacity stores its count and stops.
    bin_items           (torch ops on the lists) every key and its bin, flat, for the group-wide
                        radix select of global scope when C stays on the device.

A key's low 32 bits encode (t + token_offset) * E + e, so the lists need no token column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from capaware_megatron.config import TRITON_MAX_EXPERTS
from capaware_megatron.priority import NOT_ROUTED, check_key_range, random_salt

PRIORITY_CODES = {"score": 0, "position": 1, "reverse": 2, "random": 3}


@dataclass
class CandidateLists:
    """Every candidate assignment's priority key, listed per expert (the Triton plan's state).

    Attributes:
        keys: [E, T] int64; row e holds counts[e] keys of expert e's candidates, unordered.
        counts: [E] int32, candidates per expert.
        token_offset: index of this rank's first token in the group (decodes keys to tokens):
            an int, or a 0-dim int64 tensor on the device.
    """

    keys: torch.Tensor
    counts: torch.Tensor
    token_offset: Union[int, torch.Tensor]


@triton.jit
def _lowbias32(x):
    """lowbias32 on int64 lanes holding uint32 values (wrapping products, masked to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _priority_key(score, group_token, expert, num_experts, salt, PRIORITY: tl.constexpr):
    """capaware_megatron.priority's key: hi * 2**32 + (2**32 - 1 - flat index)."""
    flat = group_token * num_experts + expert
    if PRIORITY == 0:
        bits = (score.to(tl.float32) + 0.0).to(tl.int32, bitcast=True)
        hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    elif PRIORITY == 1:
        hi = tl.zeros_like(flat)
    elif PRIORITY == 2:
        hi = group_token + tl.zeros_like(flat)
    else:
        hi = _lowbias32(flat ^ salt) - 2147483648
    return hi * 4294967296 + (4294967295 - flat)


@triton.jit
def _collect_kernel(
    scores_ptr,
    candidates_ptr,
    map_ptr,
    probs_ptr,
    keep_ptr,
    weights_ptr,
    lists_ptr,
    counts_ptr,
    num_tokens,
    num_experts,
    stride_st,
    stride_se,
    stride_ct,
    stride_ce,
    stride_mt,
    stride_me,
    stride_pt,
    stride_pe,
    token_offset,
    salt,
    PRIORITY: tl.constexpr,
    HAS_PROBS: tl.constexpr,
    OFFSET_IN_MEMORY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    if OFFSET_IN_MEMORY:  # a device tensor (the group's counts were never read on the host)
        token_offset = tl.load(token_offset).to(tl.int64)
    token = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    in_rows = token < num_tokens
    for e0 in range(0, num_experts, BLOCK_E):
        columns = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
        expert = columns[None, :]
        inside = in_rows & (expert < num_experts)
        tl.device_assert(
            ((token + token_offset) * num_experts + expert < 4294967295) | ~inside,
            "(t + token_offset) * E + e must stay below 2**32 - 1",
        )
        is_candidate = tl.load(
            candidates_ptr + token * stride_ct + expert * stride_ce, mask=inside, other=0
        ) != 0
        score = tl.load(
            scores_ptr + token * stride_st + expert * stride_se, mask=is_candidate, other=0
        )
        if HAS_PROBS:
            routed = tl.load(map_ptr + token * stride_mt + expert * stride_me, mask=is_candidate, other=0)
            prob = tl.load(
                probs_ptr + token * stride_pt + expert * stride_pe,
                mask=is_candidate & (routed != 0),
                other=0,
            )
            weight = tl.where(routed != 0, prob, score.to(prob.dtype))
        else:
            weight = score
        tl.store(keep_ptr + token * num_experts + expert, is_candidate.to(tl.int8), mask=inside)
        tl.store(weights_ptr + token * num_experts + expert, tl.where(is_candidate, weight, 0), mask=inside)
        # Append the block's candidates to their experts' lists: one atomic per column.
        flags = is_candidate.to(tl.int32)
        per_column = tl.sum(flags, 0)
        base = tl.atomic_add(counts_ptr + columns, per_column, mask=per_column > 0)
        slot = (base[None, :] + tl.cumsum(flags, 0) - flags).to(tl.int64)
        key = _priority_key(score, token + token_offset, expert, num_experts, salt, PRIORITY)
        tl.store(lists_ptr + expert * num_tokens + slot, key, mask=is_candidate)


@triton.jit
def _select_kernel(
    lists_ptr,
    counts_ptr,
    bin_experts_ptr,
    thresholds_ptr,
    top_ptr,
    num_tokens,
    experts_per_bin,
    capacity,
    WRITE_TOP: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    bin_id = tl.program_id(0)
    tl.device_assert(capacity >= 1, "capacity must be >= 1")
    members = tl.arange(0, BLOCK_M)
    member_experts = tl.load(
        bin_experts_ptr + bin_id * experts_per_bin + members, mask=members < experts_per_bin, other=0
    )
    total = tl.sum(tl.load(counts_ptr + member_experts, mask=members < experts_per_bin, other=0), 0)
    threshold = tl.full([], -9223372036854775808, tl.int64)
    if total >= capacity:
        digits = tl.arange(0, 256)
        prefix = tl.zeros([], dtype=tl.int64)  # digits found so far, in the unsigned bit pattern
        remaining = capacity  # rank still sought among keys that share `prefix`
        for step in tl.static_range(8):
            shift = 56 - 8 * step
            hist = tl.zeros([256], dtype=tl.int32)
            for member in range(0, experts_per_bin):
                expert = tl.load(bin_experts_ptr + bin_id * experts_per_bin + member)
                count = tl.load(counts_ptr + expert)
                for start in range(0, count, BLOCK):
                    pos = start + tl.arange(0, BLOCK)
                    valid = pos < count
                    key = tl.load(lists_ptr + expert * num_tokens + pos, mask=valid, other=0)
                    unsigned = key ^ -9223372036854775808  # sign bit flipped: unsigned order
                    if step > 0:
                        high = tl.full([], -1, tl.int64) << (shift + 8)  # the digits already fixed
                        valid = valid & ((unsigned & high) == prefix)
                    digit = ((unsigned >> shift) & 255).to(tl.int32)
                    hist += tl.histogram(digit, 256, mask=valid)
            # Count of keys with digit >= d, and the largest d whose count still reaches `remaining`.
            at_least = tl.cumsum(hist, 0, reverse=True)
            chosen = tl.max(tl.where(at_least >= remaining, digits, 0), 0)
            remaining -= tl.sum(tl.where(digits > chosen, hist, 0), 0)
            prefix = prefix | (chosen.to(tl.int64) << shift)
        threshold = prefix ^ -9223372036854775808
    tl.store(thresholds_ptr + bin_id, threshold)
    if WRITE_TOP:  # the keys at or above the threshold: at most `capacity` of them
        written = 0
        for member in range(0, experts_per_bin):
            expert = tl.load(bin_experts_ptr + bin_id * experts_per_bin + member)
            count = tl.load(counts_ptr + expert)
            for start in range(0, count, BLOCK):
                pos = start + tl.arange(0, BLOCK)
                key = tl.load(lists_ptr + expert * num_tokens + pos, mask=pos < count, other=0)
                flags = ((pos < count) & (key >= threshold)).to(tl.int32)
                slot = written + tl.cumsum(flags, 0) - flags
                tl.store(top_ptr + bin_id * capacity + slot, key, mask=flags != 0)
                written += tl.sum(flags, 0)


@triton.jit
def _drop_kernel(
    lists_ptr,
    counts_ptr,
    expert_to_bin_ptr,
    thresholds_ptr,
    keep_ptr,
    weights_ptr,
    kept_ptr,
    num_tokens,
    num_experts,
    token_offset,
    OFFSET_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    if OFFSET_IN_MEMORY:
        token_offset = tl.load(token_offset).to(tl.int64)
    count = tl.load(counts_ptr + expert)
    threshold = tl.load(thresholds_ptr + tl.load(expert_to_bin_ptr + expert))
    dropped = 0
    if threshold != -9223372036854775808:
        for start in range(0, count, BLOCK):
            pos = start + tl.arange(0, BLOCK)
            key = tl.load(lists_ptr + expert * num_tokens + pos, mask=pos < count, other=0)
            flags = ((pos < count) & (key < threshold)).to(tl.int32)
            token = (4294967295 - (key & 0xFFFFFFFF)) // num_experts - token_offset
            cleared = flags != 0
            tl.store(keep_ptr + token * num_experts + expert, tl.zeros([BLOCK], tl.int8), mask=cleared)
            zero_weight = tl.zeros([BLOCK], weights_ptr.dtype.element_ty)
            tl.store(weights_ptr + token * num_experts + expert, zero_weight, mask=cleared)
            dropped += tl.sum(flags, 0)
    tl.store(kept_ptr + expert, (count - dropped).to(tl.int64))


def check_num_experts(num_experts: int) -> None:
    """The kernels hold a row of experts per program: at most TRITON_MAX_EXPERTS."""
    if num_experts > TRITON_MAX_EXPERTS:
        raise ValueError(
            f"the Triton planner supports up to {TRITON_MAX_EXPERTS} experts, got {num_experts}; "
            "use backend='torch' or 'auto'"
        )


def _check_router_tensors(scores: torch.Tensor, *others: torch.Tensor) -> None:
    if scores.dim() != 2 or any(other.shape != scores.shape for other in others):
        raise ValueError(
            "scores, candidates, routing_map and probs must all be [T, E], got "
            f"{[tuple(t.shape) for t in (scores, *others)]}"
        )
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    check_num_experts(scores.shape[1])


def collect_candidates(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor],
    priority: str,
    seed: int = 0,
    token_offset: Union[int, torch.Tensor] = 0,
    max_candidates: Optional[int] = None,
) -> tuple[CandidateLists, torch.Tensor, torch.Tensor]:
    """Triton twin of capaware_megatron.ops.collect_candidates: (lists, keep, weights).

    keep and weights are the plan before capacity (every candidate kept); drop_below clears
    what does not fit. max_candidates is the interface's bound on candidates per token, which
    per-expert lists do not need.
    """
    _check_router_tensors(scores, candidates, routing_map, *([] if probs is None else [probs]))
    for name, mask in (("candidates", candidates), ("routing_map", routing_map)):
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be torch.bool, got {mask.dtype}")
    if priority not in PRIORITY_CODES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITY_CODES)}; got {priority!r}")
    num_tokens, num_experts = scores.shape
    check_key_range(token_offset, num_tokens, num_experts)
    device = scores.device
    weights_dtype = scores.dtype if probs is None else probs.dtype
    keep = torch.empty(num_tokens, num_experts, dtype=torch.bool, device=device)
    weights = torch.empty(num_tokens, num_experts, dtype=weights_dtype, device=device)
    lists = CandidateLists(
        keys=torch.empty(num_experts, num_tokens, dtype=torch.int64, device=device),
        counts=torch.zeros(num_experts, dtype=torch.int32, device=device),
        token_offset=token_offset,
    )
    if num_tokens == 0:
        return lists, keep, weights
    # bool storage read as bytes: no copy, any strides.
    candidate_bytes, map_bytes = candidates.view(torch.uint8), routing_map.view(torch.uint8)
    probs = scores if probs is None else probs
    block_e = min(triton.next_power_of_2(num_experts), 128)
    block_t = max(1, 4096 // block_e)
    _collect_kernel[(triton.cdiv(num_tokens, block_t),)](
        scores, candidate_bytes, map_bytes, probs, keep.view(torch.int8), weights,
        lists.keys, lists.counts, num_tokens, num_experts,
        scores.stride(0), scores.stride(1), candidate_bytes.stride(0), candidate_bytes.stride(1),
        map_bytes.stride(0), map_bytes.stride(1), probs.stride(0), probs.stride(1),
        token_offset, random_salt(seed),
        PRIORITY=PRIORITY_CODES[priority], HAS_PROBS=probs is not scores,
        OFFSET_IN_MEMORY=isinstance(token_offset, torch.Tensor),
        BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return lists, keep, weights


def _select(
    lists: CandidateLists, bin_experts: torch.Tensor, capacity: int, write_top: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    device = lists.keys.device
    bin_experts = bin_experts.to(device=device, dtype=torch.int64).contiguous()
    num_bins, per_bin = bin_experts.shape
    thresholds = torch.full((num_bins,), NOT_ROUTED, dtype=torch.int64, device=device)
    top = None
    if write_top:
        top = torch.full((num_bins, capacity), NOT_ROUTED, dtype=torch.int64, device=device)
    num_tokens = lists.keys.shape[1]
    if num_tokens == 0 or num_bins == 0:
        return thresholds, top
    _select_kernel[(num_bins,)](
        lists.keys, lists.counts, bin_experts, thresholds, thresholds if top is None else top,
        num_tokens, per_bin, capacity,
        WRITE_TOP=write_top, BLOCK=1024, BLOCK_M=triton.next_power_of_2(per_bin),
    )
    return thresholds, top


def bin_thresholds(lists: CandidateLists, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] int64: the capacity-th largest key of each bin, NOT_ROUTED when it has fewer.

    Args:
        lists: from collect_candidates.
        bin_experts: [B, m] int64, the experts of each bin.
        capacity: C >= 1.
    """
    return _select(lists, bin_experts, capacity, write_top=False)[0]


def bin_top_keys(lists: CandidateLists, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, C] int64: each bin's largest keys, unordered, padded with NOT_ROUTED."""
    return _select(lists, bin_experts, capacity, write_top=True)[1]


def bin_items(lists: CandidateLists, expert_to_bin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [E * T], bins [E * T]): every listed key, NOT_ROUTED past each list's count, and its
    bin (global scope with C on the device: capaware_megatron.ops.kth_largest selects from them)."""
    num_experts, num_tokens = lists.keys.shape
    positions = torch.arange(num_tokens, device=lists.keys.device)
    keys = lists.keys.masked_fill(positions >= lists.counts.unsqueeze(1), NOT_ROUTED)
    bins = expert_to_bin.to(keys.device).unsqueeze(1).expand(num_experts, num_tokens)
    return keys.reshape(-1), bins.reshape(-1)


def drop_below(
    lists: CandidateLists,
    thresholds: torch.Tensor,
    expert_to_bin: torch.Tensor,
    keep: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of capaware_megatron.ops.drop_below: (keep, weights, kept per expert [E]).

    Clears keep and weights in place where a candidate's key is below its bin's threshold.
    """
    num_experts, num_tokens = lists.keys.shape
    device = lists.keys.device
    kept = torch.empty(num_experts, dtype=torch.int64, device=device)
    if num_tokens == 0:
        kept.zero_()
        return keep, weights, kept
    _drop_kernel[(num_experts,)](
        lists.keys, lists.counts, expert_to_bin.to(device=device, dtype=torch.int64).contiguous(),
        thresholds.contiguous(), keep.view(torch.int8), weights, kept,
        num_tokens, num_experts, lists.token_offset,
        OFFSET_IN_MEMORY=isinstance(lists.token_offset, torch.Tensor), BLOCK=1024,
    )
    return keep, weights, kept
