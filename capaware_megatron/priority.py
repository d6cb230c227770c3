"""Priority keys: one int64 per (token, expert) assignment, unique and totally ordered.

An over-full expert (or device) keeps its assignments with the largest keys. Folding the priority
and its tie-break into one integer makes the order identical in torch, in Triton and across ranks
(the global scope compares keys made on different ranks), and lets a threshold ("keep keys >= the
C-th largest") describe a whole expert's decision.

    key = hi * 2**32 + lo
    lo  = 2**32 - 1 - (t * E + e)       ties go to the earlier token, then the lower expert
    hi  = score:    the fp32 score's bits mapped to a signed int32 with the same order
          position: 0                   (earliest token first)
          reverse:  t                   (latest token first)
          random:   lowbias32(seed, t * E + e) - 2**31

t is the token's index in the group (global scope) or on this rank; t * E + e < 2**32 - 1 is
required; that allows for example 8M tokens at E = 512.
"""

from __future__ import annotations

from typing import Union

import torch

NOT_ROUTED = torch.iinfo(torch.int64).min
"""Key of a (token, expert) pair that is not a candidate: below every real key."""

MAX_ASSIGNMENTS = 2**32
_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


def sortable_float_bits(scores: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int32 with the same order (-0.0 counts as 0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def random_priority(flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded pseudo-random int32-range priority of assignment t * E + e."""
    return lowbias32(flat_index ^ random_salt(seed)) - 2**31


def check_key_range(token_offset: Union[int, torch.Tensor], num_tokens: int, num_experts: int) -> None:
    """Every t * E + e must stay below 2**32 - 1 for the keys to be unique and ordered.

    A token_offset on the device (a 0-dim tensor: the group's counts were not read) is checked
    there: an asynchronous device assert, which does not wait for the host.
    """
    if isinstance(token_offset, torch.Tensor):
        torch._assert_async(
            (token_offset + num_tokens) * num_experts < MAX_ASSIGNMENTS,
            f"(token_offset + T) * E must stay below {MAX_ASSIGNMENTS}: priority keys cannot order "
            "more assignments",
        )
        return
    if (token_offset + num_tokens) * num_experts >= MAX_ASSIGNMENTS:
        raise ValueError(
            f"(token_offset + T) * E = {(token_offset + num_tokens) * num_experts} must stay below "
            f"{MAX_ASSIGNMENTS}: priority keys cannot order more assignments"
        )


def random_salt(seed: int) -> int:
    """The 32-bit value the seed is mixed into every hashed index with."""
    return (seed * _GOLDEN32) & _MASK32


def listed_keys(
    scores: torch.Tensor,
    experts: torch.Tensor,
    listed: torch.Tensor,
    priority: str,
    seed: int = 0,
    token_offset: Union[int, torch.Tensor] = 0,
) -> torch.Tensor:
    """Keys of listed assignments: each token's K experts (a few of E), NOT_ROUTED off `listed`.

    Args:
        scores: [T, E] router probabilities (any float dtype; compared as fp32).
        experts: [T, K] int64, the experts of each token's listed assignments.
        listed: [T, K] bool, which entries are assignments (the rest fill the list).
        priority: "score" | "position" | "reverse" | "random".
        seed: seed of "random".
        token_offset: index of this rank's first token in the group (global scope): an int, or
            a 0-dim int64 tensor on the scores' device.

    Returns:
        [T, K] int64: the key of (t, experts[t, j]).
    """
    num_tokens, num_experts = scores.shape
    check_key_range(token_offset, num_tokens, num_experts)
    token = torch.arange(num_tokens, device=scores.device, dtype=torch.int64).unsqueeze(1)
    token = token + token_offset
    flat = token * num_experts + experts
    if priority == "score":
        hi = sortable_float_bits(scores.gather(1, experts)).long()
    elif priority == "position":
        hi = torch.zeros_like(flat)
    elif priority == "reverse":
        hi = token.expand_as(flat)
    elif priority == "random":
        hi = random_priority(flat, seed)
    else:
        raise ValueError(f"priority must be score, position, reverse or random; got {priority!r}")
    keys = hi * MAX_ASSIGNMENTS + (_MASK32 - flat)
    return keys.masked_fill(~listed, NOT_ROUTED)


def decode_token(keys: torch.Tensor, num_experts: int, token_offset: int = 0) -> torch.Tensor:
    """[M] int64: the token (on this rank) of each candidate key: its low bits hold t * E + e."""
    flat = _MASK32 - (keys & _MASK32)
    return flat // num_experts - token_offset
