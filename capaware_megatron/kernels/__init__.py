"""Triton kernels computing the routing plan (installed as capaware_megatron.kernels).

The planner picks them with CapacityConfig(backend="triton"), or backend="auto" on CUDA tensors;
capaware_megatron.ops holds the torch twins they are tested against.
"""

import re

try:
    import triton
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "capaware_megatron.kernels needs triton: pip install 'capaware_megatron[triton]'"
    ) from err

MIN_TRITON = (3, 5)
"""Older Triton hands the result of a tensor atomic only to the threads that ran it
(triton-lang/triton#7402, fixed in 3.5): the candidate lists would be corrupted on GPU."""


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


if _version_tuple(triton.__version__) < MIN_TRITON:
    raise ImportError(
        f"capaware_megatron.kernels needs triton >= {'.'.join(map(str, MIN_TRITON))}, found "
        f"{triton.__version__}; use backend='torch' (backend='auto' does so by itself)"
    )

from .permute import permutation_indices
from .routing_plan import (
    CandidateLists,
    bin_items,
    bin_thresholds,
    bin_top_keys,
    collect_candidates,
    drop_below,
)

__all__ = [
    "CandidateLists",
    "bin_items",
    "bin_thresholds",
    "bin_top_keys",
    "collect_candidates",
    "drop_below",
    "permutation_indices",
]
