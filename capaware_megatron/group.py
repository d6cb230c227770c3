"""The group a global-scope plan spans, as the planner sees it: one gather primitive.

The core never looks up a process group; the framework plugins build a RoutingGroup from the group
they were given (Megatron's pg_collection.ep / tp_ep, DeepSpeed's expert-parallel group) and pass
it in. Only small fixed-size tensors travel through it: token counts, per-bin top-C priority keys
and, per reroute round, kept loads and top-C proposal keys; never hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

GatherFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RoutingGroup:
    """This rank's place in the group.

    Attributes:
        rank: this rank's index in the group (its tokens follow those of ranks 0..rank-1).
        world_size: number of ranks.
        all_gather: takes a tensor of the same shape and dtype on every rank and returns them
            stacked, ``[world_size, *shape]``, in rank order.
        tokens_per_rank: every rank plans exactly this many tokens (Megatron's CUDA-graph
            decode pads every EP rank to one token count): the group's layout follows from the
            shapes and no token counts are exchanged. None: exchanged per plan.
    """

    rank: int
    world_size: int
    all_gather: GatherFn
    tokens_per_rank: Optional[int] = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"RoutingGroup needs 0 <= rank < world_size, got rank={self.rank}, "
                f"world_size={self.world_size}"
            )
        if self.tokens_per_rank is not None and self.tokens_per_rank < 0:
            raise ValueError(f"tokens_per_rank must be >= 0, got {self.tokens_per_rank}")

    @classmethod
    def from_process_group(cls, process_group: Any = None, copies: Any = None) -> "RoutingGroup":
        """Wrap a torch.distributed process group (None: the default group).

        Args:
            process_group: the ranks whose tokens one plan caps together.
            copies: a process group whose ranks hold the same tokens (tensor parallelism without
                sequence parallelism: the attention TP group). The group then counts each set of
                copies once, as one rank, and its ranks plan alike. Found once, here, with one
                host-side gather; plans gather only from the first rank of each set.
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("RoutingGroup.from_process_group needs torch.distributed initialised")
        world_size = dist.get_world_size(process_group)

        def gather_all(tensor: torch.Tensor) -> torch.Tensor:
            # Backends differ in bool support (gloo has none): bools travel as uint8.
            wire = tensor.contiguous().to(torch.uint8) if tensor.dtype == torch.bool else tensor
            parts = [torch.empty_like(wire) for _ in range(world_size)]
            dist.all_gather(parts, wire.contiguous(), group=process_group)
            return torch.stack(parts).to(tensor.dtype)

        rank = dist.get_rank(process_group)
        if copies is None or dist.get_world_size(copies) == 1:
            return cls(rank, world_size, gather_all)
        # Each rank's set of copies, named by its first global rank, in this group's rank order.
        sources: list[Any] = [None] * world_size
        dist.all_gather_object(sources, min(dist.get_process_group_ranks(copies)), group=process_group)
        unique = list(dict.fromkeys(sources))
        first_ranks = torch.tensor([sources.index(source) for source in unique])
        on_device: dict[torch.device, torch.Tensor] = {}

        def gather_unique(tensor: torch.Tensor) -> torch.Tensor:
            stacked = gather_all(tensor)
            if stacked.device not in on_device:
                on_device[stacked.device] = first_ranks.to(stacked.device)
            return stacked.index_select(0, on_device[stacked.device])

        return cls(unique.index(sources[rank]), len(unique), gather_unique)
