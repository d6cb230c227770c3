"""Triton kernels computing the routing plan (installed as capaware_megatron.kernels).

The planner picks them with CapacityConfig(backend="triton"), or backend="auto" on CUDA tensors;
capaware_megatron.planner is the torch reference they are tested against.
"""

try:
    import triton  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "capaware_megatron.kernels needs triton: pip install 'capaware_megatron[triton]'"
    ) from err

from .permute import permutation_indices
from .reroute import propose_experts
from .routing_plan import (
    CandidateLists,
    bin_thresholds,
    bin_top_keys,
    collect_candidates,
    drop_below,
)

__all__ = [
    "CandidateLists",
    "bin_thresholds",
    "bin_top_keys",
    "collect_candidates",
    "drop_below",
    "permutation_indices",
    "propose_experts",
]
