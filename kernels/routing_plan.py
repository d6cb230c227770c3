"""Triton kernels for the routing plan: priority keys and per-bin capacity thresholds.

Same results as the torch planner, bit for bit: the keys are the ones capaware_megatron.priority
defines, and a threshold is the exact C-th largest key of a bin, so `keep = key >= threshold`
needs no sort and no tie handling.

    K1 _keys_kernel       scores [T, E] fp32/bf16/fp16 (any strides), candidates [T, E] bool
                          -> keys [T, E] int64 (NOT_ROUTED where not a candidate)
                          grid (cdiv(T, BLOCK_T),); each program loops over E in BLOCK_E columns.
    K2 _threshold_kernel  keys [T, E], bin_experts [B, m] int64 (the experts of each bin)
                          -> thresholds [B] int64: the capacity-th largest key of the bin, or
                          NOT_ROUTED when the bin has fewer than `capacity` candidates.
                          grid (B,); radix select on the key's unsigned bit pattern, 4-bit
                          digits from the top: 16 passes over the bin's T * m keys, each pass a
                          16-bucket histogram of the keys that share the digits found so far.

    K3 _apply_kernel      keys, thresholds, expert_to_bin [E], routing_map, probs, scores
                          -> keep [T, E] bool, weights [T, E] (router weight for router picks,
                          score for other candidates, 0 where not kept), kept per expert [E]
                          int64 (one atomic add per column block). grid (cdiv(T, BLOCK_T),).

The threshold is exact for any key distribution (no sampling, no float rounding), which is what
makes the Triton plan equal to the torch one and to the single-process plan in global scope.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from capaware_megatron.priority import NOT_ROUTED, check_key_range, random_salt

PRIORITY_CODES = {"score": 0, "position": 1, "reverse": 2, "random": 3}


@triton.jit
def _lowbias32(x):
    """lowbias32 on int64 lanes holding uint32 values (wrapping products, masked to 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _keys_kernel(
    scores_ptr,
    candidates_ptr,
    keys_ptr,
    num_tokens,
    num_experts,
    stride_st,
    stride_se,
    stride_ct,
    stride_ce,
    token_offset,
    salt,
    PRIORITY: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    token = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    in_rows = token < num_tokens
    for e0 in range(0, num_experts, BLOCK_E):
        expert = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)[None, :]
        inside = in_rows & (expert < num_experts)
        is_candidate = tl.load(
            candidates_ptr + token * stride_ct + expert * stride_ce, mask=inside, other=0
        )
        flat = (token + token_offset) * num_experts + expert
        tl.device_assert((flat < 4294967295) | ~inside, "t * E + e must stay below 2**32 - 1")
        if PRIORITY == 0:
            score = tl.load(scores_ptr + token * stride_st + expert * stride_se, mask=inside, other=0)
            bits = (score.to(tl.float32) + 0.0).to(tl.int32, bitcast=True)
            hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        elif PRIORITY == 1:
            hi = tl.zeros_like(flat)
        elif PRIORITY == 2:
            hi = token + token_offset + tl.zeros_like(flat)
        else:
            hi = _lowbias32(flat ^ salt) - 2147483648
        key = hi * 4294967296 + (4294967295 - flat)
        key = tl.where(is_candidate != 0, key, -9223372036854775808)
        tl.store(keys_ptr + token * num_experts + expert, key, mask=inside)


@triton.jit
def _threshold_kernel(
    keys_ptr,
    bin_experts_ptr,
    thresholds_ptr,
    num_tokens,
    num_experts,
    experts_per_bin,
    capacity,
    BLOCK: tl.constexpr,
):
    bin_id = tl.program_id(0)
    tl.device_assert(capacity >= 1, "capacity must be >= 1")
    length = num_tokens * experts_per_bin
    digits = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.int64)  # digits found so far, in the unsigned bit pattern
    remaining = capacity  # rank still sought among keys that share `prefix`
    total = 0
    for step in tl.static_range(16):
        shift = 60 - 4 * step
        hist = tl.zeros([16], dtype=tl.int32)
        for start in range(0, length, BLOCK):
            pos = (start + tl.arange(0, BLOCK)).to(tl.int64)
            valid = pos < length
            token = pos // experts_per_bin
            expert = tl.load(
                bin_experts_ptr + bin_id * experts_per_bin + pos % experts_per_bin,
                mask=valid,
                other=0,
            )
            key = tl.load(keys_ptr + token * num_experts + expert, mask=valid, other=0)
            valid = valid & (key != -9223372036854775808)
            unsigned = key ^ -9223372036854775808  # sign bit flipped: unsigned order
            if step > 0:
                high = tl.full([], -1, tl.int64) << (shift + 4)  # the digits already fixed
                valid = valid & ((unsigned & high) == prefix)
            digit = ((unsigned >> shift) & 15).to(tl.int32)
            hist += tl.sum(((digit[:, None] == digits[None, :]) & valid[:, None]).to(tl.int32), 0)
        if step == 0:
            total = tl.sum(hist, 0)
        # Count of keys with digit >= d, and the largest d whose count still reaches `remaining`.
        at_least = tl.sum(tl.where(digits[None, :] >= digits[:, None], hist[None, :], 0), 1)
        chosen = tl.max(tl.where(at_least >= remaining, digits, 0), 0)
        remaining -= tl.sum(tl.where(digits > chosen, hist, 0), 0)
        prefix = prefix | (chosen.to(tl.int64) << shift)
    threshold = prefix ^ -9223372036854775808
    threshold = tl.where(total >= capacity, threshold, -9223372036854775808)
    tl.store(thresholds_ptr + bin_id, threshold)


@triton.jit
def _apply_kernel(
    keys_ptr,
    thresholds_ptr,
    expert_to_bin_ptr,
    map_ptr,
    probs_ptr,
    scores_ptr,
    keep_ptr,
    weights_ptr,
    counts_ptr,
    num_tokens,
    num_experts,
    stride_mt,
    stride_me,
    stride_pt,
    stride_pe,
    stride_st,
    stride_se,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    token = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    in_rows = token < num_tokens
    for e0 in range(0, num_experts, BLOCK_E):
        expert = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)[None, :]
        in_cols = expert < num_experts
        inside = in_rows & in_cols
        key = tl.load(keys_ptr + token * num_experts + expert, mask=inside, other=-9223372036854775808)
        bin_id = tl.load(expert_to_bin_ptr + expert, mask=in_cols, other=0)
        threshold = tl.load(thresholds_ptr + bin_id, mask=in_cols, other=0)
        keep = (key >= threshold) & (key != -9223372036854775808) & inside
        routed = tl.load(map_ptr + token * stride_mt + expert * stride_me, mask=inside, other=0) != 0
        prob = tl.load(probs_ptr + token * stride_pt + expert * stride_pe, mask=keep & routed, other=0)
        score = tl.load(scores_ptr + token * stride_st + expert * stride_se, mask=keep & ~routed, other=0)
        weight = tl.where(routed, prob, score.to(prob.dtype))
        tl.store(keep_ptr + token * num_experts + expert, keep.to(tl.int8), mask=inside)
        tl.store(weights_ptr + token * num_experts + expert, tl.where(keep, weight, 0), mask=inside)
        tl.atomic_add(counts_ptr + expert, tl.sum(keep.to(tl.int64), 0)[None, :], mask=in_cols)


def _check_key_inputs(scores: torch.Tensor, candidates: torch.Tensor, token_offset: int) -> None:
    if scores.dim() != 2 or candidates.shape != scores.shape:
        raise ValueError(
            f"scores and candidates must both be [T, E], got {tuple(scores.shape)} and "
            f"{tuple(candidates.shape)}"
        )
    if scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if candidates.dtype != torch.bool:
        raise TypeError(f"candidates must be torch.bool, got {candidates.dtype}")
    num_tokens, num_experts = scores.shape
    if num_experts > 512:
        raise ValueError(f"the Triton planner supports up to 512 experts, got {num_experts}")
    check_key_range(token_offset, num_tokens, num_experts)


def assignment_keys(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    priority: str,
    seed: int = 0,
    token_offset: int = 0,
) -> torch.Tensor:
    """Triton twin of capaware_megatron.priority.assignment_keys: [T, E] int64."""
    _check_key_inputs(scores, candidates, token_offset)
    if priority not in PRIORITY_CODES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITY_CODES)}; got {priority!r}")
    num_tokens, num_experts = scores.shape
    keys = torch.empty(num_tokens, num_experts, dtype=torch.int64, device=scores.device)
    if num_tokens == 0:
        return keys
    # bool storage read as bytes: no copy, any strides.
    candidate_bytes = candidates.view(torch.uint8)
    block_e = min(triton.next_power_of_2(num_experts), 128)
    block_t = max(1, 4096 // block_e)
    _keys_kernel[(triton.cdiv(num_tokens, block_t),)](
        scores,
        candidate_bytes,
        keys,
        num_tokens,
        num_experts,
        scores.stride(0),
        scores.stride(1),
        candidate_bytes.stride(0),
        candidate_bytes.stride(1),
        token_offset,
        random_salt(seed),
        PRIORITY=PRIORITY_CODES[priority],
        BLOCK_T=block_t,
        BLOCK_E=block_e,
    )
    return keys


def bin_thresholds(keys: torch.Tensor, bin_experts: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B] int64: the capacity-th largest key of each bin, NOT_ROUTED when it has fewer.

    Args:
        keys: [T, E] int64 contiguous, from assignment_keys.
        bin_experts: [B, m] int64, the experts of each bin.
        capacity: C >= 1.
    """
    if keys.dtype != torch.int64 or keys.dim() != 2:
        raise TypeError(f"keys must be a [T, E] int64 tensor, got {keys.dtype} {tuple(keys.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    keys = keys.contiguous()
    bin_experts = bin_experts.to(device=keys.device, dtype=torch.int64).contiguous()
    num_bins, per_bin = bin_experts.shape
    thresholds = torch.full((num_bins,), NOT_ROUTED, dtype=torch.int64, device=keys.device)
    num_tokens, num_experts = keys.shape
    if num_tokens == 0 or num_bins == 0:
        return thresholds
    _threshold_kernel[(num_bins,)](
        keys, bin_experts, thresholds, num_tokens, num_experts, per_bin, capacity, BLOCK=1024
    )
    return thresholds


def apply_thresholds(
    keys: torch.Tensor,
    thresholds: torch.Tensor,
    expert_to_bin: torch.Tensor,
    routing_map: torch.Tensor,
    probs: torch.Tensor,
    scores: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of capaware_megatron.planner.apply_thresholds: (keep, weights, kept per expert)."""
    num_tokens, num_experts = keys.shape
    if routing_map.shape != keys.shape or probs.shape != keys.shape or scores.shape != keys.shape:
        raise ValueError("keys, routing_map, probs and scores must all be [T, E]")
    keys = keys.contiguous()
    device = keys.device
    keep = torch.empty(num_tokens, num_experts, dtype=torch.bool, device=device)
    weights = torch.empty(num_tokens, num_experts, dtype=probs.dtype, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return keep, weights, counts
    map_bytes = routing_map.view(torch.uint8)
    block_e = min(triton.next_power_of_2(num_experts), 128)
    block_t = max(1, 4096 // block_e)
    _apply_kernel[(triton.cdiv(num_tokens, block_t),)](
        keys, thresholds.contiguous(), expert_to_bin.to(device=device, dtype=torch.int64).contiguous(),
        map_bytes, probs, scores, keep.view(torch.int8), weights, counts,
        num_tokens, num_experts,
        map_bytes.stride(0), map_bytes.stride(1), probs.stride(0), probs.stride(1),
        scores.stride(0), scores.stride(1),
        BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return keep, weights, counts
