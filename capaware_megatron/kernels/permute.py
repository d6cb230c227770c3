"""Triton kernel: from a plan's routing map to the expert-sorted token order of the all-to-all.

    _permute_index_kernel  routing_map [T, E] bool, probs [T, E], offsets [E] int64
                           -> sorted_indices [N] int64 (token of each expert-major slot),
                              permuted_probs [N]   (its weight)
                           grid (E,); each program walks its expert's column in token order,
                           placing selected tokens with a block-wide prefix sum.

The order is Megatron-Core's `permute` order (expert-major, tokens ascending within an expert):
`sorted_indices` gathers tokens into the expert buffers and, with `scatter_add`, brings expert
outputs back ("unpermute").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _permute_index_kernel(
    map_ptr,
    probs_ptr,
    offsets_ptr,
    sorted_ptr,
    permuted_probs_ptr,
    num_tokens,
    total,
    stride_mt,
    stride_me,
    stride_pt,
    stride_pe,
    BLOCK_T: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    base = tl.load(offsets_ptr + expert)
    for start in range(0, num_tokens, BLOCK_T):
        token = (start + tl.arange(0, BLOCK_T)).to(tl.int64)
        inside = token < num_tokens
        selected = tl.load(map_ptr + token * stride_mt + expert * stride_me, mask=inside, other=0)
        selected = (selected != 0) & inside
        ones = selected.to(tl.int64)
        slot = base + tl.cumsum(ones, 0) - 1
        tl.device_assert((slot < total) | ~selected, "slot past the permuted buffer")
        weight = tl.load(probs_ptr + token * stride_pt + expert * stride_pe, mask=selected, other=0)
        tl.store(sorted_ptr + slot, token, mask=selected)
        tl.store(permuted_probs_ptr + slot, weight, mask=selected)
        base += tl.sum(ones, 0)


def permutation_indices(
    routing_map: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_indices [N] int64, permuted_probs [N], tokens_per_expert [E] int64).

    N = routing_map.sum(); equals Megatron-Core's
    ``arange(T).expand(E, T).masked_select(routing_map.T)`` and
    ``probs.T.masked_select(routing_map.T)``.
    """
    if routing_map.dim() != 2 or routing_map.dtype != torch.bool:
        raise TypeError(f"routing_map must be a [T, E] bool tensor, got {routing_map.dtype}")
    if probs.shape != routing_map.shape:
        raise ValueError(
            f"probs shape {tuple(probs.shape)} must equal routing_map shape {tuple(routing_map.shape)}"
        )
    num_tokens, num_experts = routing_map.shape
    tokens_per_expert = routing_map.sum(0, dtype=torch.int64)
    offsets = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    total = int(tokens_per_expert.sum())  # the buffer size: one host sync, as in Megatron-Core
    sorted_indices = torch.empty(total, dtype=torch.int64, device=routing_map.device)
    permuted_probs = torch.empty(total, dtype=probs.dtype, device=routing_map.device)
    if total == 0:
        return sorted_indices, permuted_probs, tokens_per_expert
    map_bytes = routing_map.view(torch.uint8)
    _permute_index_kernel[(num_experts,)](
        map_bytes,
        probs,
        offsets,
        sorted_indices,
        permuted_probs,
        num_tokens,
        total,
        map_bytes.stride(0),
        map_bytes.stride(1),
        probs.stride(0),
        probs.stride(1),
        BLOCK_T=1024,
    )
    if torch.is_grad_enabled() and probs.requires_grad:
        # The kernel writes outside autograd: gather the same weights through torch.
        experts = torch.repeat_interleave(
            torch.arange(num_experts, device=routing_map.device), tokens_per_expert, output_size=total
        )
        permuted_probs = probs[sorted_indices, experts]
    return sorted_indices, permuted_probs, tokens_per_expert
