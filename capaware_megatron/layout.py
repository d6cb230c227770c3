"""ExpertLayout: where one MoE layer's experts live, checked once when the layer is built;
Bins: where the plan caps their load (an expert each, or an EP rank each for scope device).

The plan needs the layout per forward (scope device: each expert's EP rank; policy expanded: the
experts on this rank). Checking a mapping reads it on the host, so layers build their layout
once and pass it to every plan: the per-forward path then has no host work on it at all. Drop's
thresholds and reroute's rounds both count loads per bin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

ExpertSet = Union[Sequence[int], torch.Tensor]


@dataclass(frozen=True, eq=False)
class ExpertLayout:
    """expert_to_rank [E] int64 (every EP rank 0..R-1 hosts E/R experts), num_ranks R, and
    local_experts [E] bool (this rank's experts; None when unknown), num_local of them."""

    expert_to_rank: torch.Tensor
    num_ranks: int
    local_experts: Optional[torch.Tensor] = None
    num_local: int = 0
    """How many experts local_experts marks (counted once, at build)."""
    _copies: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_experts(self) -> int:
        return self.expert_to_rank.numel()

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @classmethod
    def build(
        cls,
        num_experts: int,
        expert_to_rank: Optional[ExpertSet] = None,
        local_experts: Optional[ExpertSet] = None,
    ) -> "ExpertLayout":
        """Validated on the host; errors name the argument and what is allowed.

        Args:
            num_experts: E.
            expert_to_rank: [E] EP rank of each expert (default: all on one rank).
            local_experts: this rank's experts, as indices or an [E] bool mask.
        """
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if expert_to_rank is None:
            mapping = torch.zeros(num_experts, dtype=torch.int64)
        else:
            mapping = _index_tensor("expert_to_rank", expert_to_rank)
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
        local = _local_mask(local_experts, num_experts)
        return cls(mapping, num_ranks, local, 0 if local is None else int(local.sum()))

    def to(self, device: torch.device) -> "ExpertLayout":
        """This layout's tensors on `device` (copied once per device, then reused)."""
        device = torch.device(device)
        if self.expert_to_rank.device == device:
            return self
        key = str(device)
        if key not in self._copies:
            local = None if self.local_experts is None else self.local_experts.to(device)
            self._copies[key] = ExpertLayout(
                self.expert_to_rank.to(device), self.num_ranks, local, self.num_local)
        return self._copies[key]


@dataclass(frozen=True)
class Bins:
    """Where each expert's load is capped: expert_to_bin [E], num_bins B, experts_per_bin m;
    are_experts: expert_to_bin is arange(E) (each expert its own bin, scopes local and global),
    so bins need no lookup. EP ranks of one expert each need not hold them in order: False."""

    expert_to_bin: torch.Tensor
    num_bins: int
    experts_per_bin: int
    are_experts: bool = False

    @property
    def experts(self) -> torch.Tensor:
        """[B, m] int64: the experts of each bin."""
        order = torch.argsort(self.expert_to_bin, stable=True)
        return order.view(self.num_bins, self.experts_per_bin)

    def per_bin(self, per_expert: torch.Tensor) -> torch.Tensor:
        """[E] -> [B]: sum over each bin's experts."""
        out = torch.zeros(self.num_bins, dtype=per_expert.dtype, device=per_expert.device)
        return out.index_add_(0, self.expert_to_bin, per_expert)

    @classmethod
    def for_scope(cls, scope: str, layout: Optional[ExpertLayout], num_experts: int,
                  device: torch.device) -> "Bins":
        """Scope device: the layout's EP ranks; local and global: each expert its own bin."""
        if scope != "device":
            return cls(torch.arange(num_experts, device=device), num_experts, 1, are_experts=True)
        return cls(layout.expert_to_rank, layout.num_ranks, layout.experts_per_rank)


def _index_tensor(name: str, value: ExpertSet) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(list(value), dtype=torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.dim() != 1:
        raise TypeError(f"{name} must be a 1-D sequence of integer indices")
    return tensor.detach().to(device="cpu", dtype=torch.int64)


def _local_mask(local_experts: Optional[ExpertSet], num_experts: int) -> Optional[torch.Tensor]:
    if local_experts is None:
        return None
    if isinstance(local_experts, torch.Tensor) and local_experts.dtype == torch.bool:
        if local_experts.shape != (num_experts,):
            raise ValueError(f"a local_experts mask must be [{num_experts}], got {tuple(local_experts.shape)}")
        return local_experts.detach().cpu()
    index = _index_tensor("local_experts", local_experts)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_experts):
        raise ValueError(f"local_experts must lie in [0, {num_experts}), got {index.tolist()}")
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[index] = True
    return mask
