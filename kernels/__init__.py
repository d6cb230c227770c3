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
from .routing_plan import apply_thresholds, assignment_keys, bin_thresholds

__all__ = [
    "apply_thresholds",
    "assignment_keys",
    "bin_thresholds",
    "permutation_indices",
    "propose_experts",
]
