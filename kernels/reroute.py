"""Triton kernel: one round of reroute proposals (the inner step of the serial placement).

    _propose_kernel  preference [U, E] int64 (each overflow token's experts, best score first),
                     slot [P] (each pending item's token), rank_in_token [P] int64,
                     token_used [U, E] bool, room [B] int64, expert_to_bin [E] int64
                     -> expert [P] int64 (the rank_in_token-th free expert in preference order),
                        has_choice [P] bool
                     grid (cdiv(P, BLOCK_P),); one row of E <= 512 experts per item in registers:
                     free mask, prefix count, selection, all fused.

The rounds around it (which prefix of the proposals commits) stay in
capaware_megatron.planner._place_overflow; this replaces the [P, E] gathers and cumsum of
planner.propose_experts, which it equals exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing_plan import check_num_experts


@triton.jit
def _propose_kernel(
    preference_ptr,
    slot_ptr,
    rank_ptr,
    used_ptr,
    room_ptr,
    bin_ptr,
    expert_ptr,
    has_choice_ptr,
    num_pending,
    num_experts,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    valid_rows = rows < num_pending
    cols = tl.arange(0, BLOCK_E).to(tl.int64)
    valid_cols = cols < num_experts
    inside = valid_rows[:, None] & valid_cols[None, :]
    slot = tl.load(slot_ptr + rows, mask=valid_rows, other=0)
    rank = tl.load(rank_ptr + rows, mask=valid_rows, other=0)
    ranked = tl.load(preference_ptr + slot[:, None] * num_experts + cols[None, :], mask=inside, other=0)
    room = tl.load(room_ptr + tl.load(bin_ptr + ranked, mask=inside, other=0), mask=inside, other=0)
    used = tl.load(used_ptr + slot[:, None] * num_experts + ranked, mask=inside, other=1)
    free = (inside & (room > 0) & (used == 0)).to(tl.int64)
    running = tl.cumsum(free, axis=1)
    has_choice = tl.sum(free, axis=1) > rank
    position = tl.sum(((running <= rank[:, None]) & valid_cols[None, :]).to(tl.int64), axis=1)
    position = tl.minimum(position, num_experts - 1)
    expert = tl.sum(tl.where(cols[None, :] == position[:, None], ranked, 0), axis=1)
    tl.store(expert_ptr + rows, expert, mask=valid_rows)
    tl.store(has_choice_ptr + rows, has_choice.to(tl.int8), mask=valid_rows)


def propose_experts(
    preference: torch.Tensor,
    slot: torch.Tensor,
    rank_in_token: torch.Tensor,
    token_used: torch.Tensor,
    room: torch.Tensor,
    expert_to_bin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of capaware_megatron.planner.propose_experts: (expert [P], has_choice [P])."""
    num_pending = slot.shape[0]
    num_experts = preference.shape[1]
    check_num_experts(num_experts)
    device = preference.device
    expert = torch.empty(num_pending, dtype=torch.int64, device=device)
    has_choice = torch.empty(num_pending, dtype=torch.bool, device=device)
    if num_pending == 0:
        return expert, has_choice
    block_e = triton.next_power_of_2(num_experts)
    block_p = max(1, 4096 // block_e)
    _propose_kernel[(triton.cdiv(num_pending, block_p),)](
        preference.contiguous(), slot.long().contiguous(),
        rank_in_token.long().contiguous(), token_used.contiguous().view(torch.uint8),
        room.long().contiguous(), expert_to_bin.long().contiguous(), expert, has_choice.view(torch.int8),
        num_pending, num_experts, BLOCK_P=block_p, BLOCK_E=block_e,
    )
    return expert, has_choice
