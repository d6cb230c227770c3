"""The torch backend of the plan: twins of the Triton kernels (routing_plan) and the bounded
reroute rounds (reroute), the CPU path and the reference the kernels are tested against."""

from .reroute import Bins, Rerouted, reroute
from .routing_plan import (
    bin_major,
    bin_thresholds,
    bin_top_keys,
    collect_candidates,
    drop_below,
    group_kth_keys,
    group_top_keys,
    router_or_score,
    top_keys,
)

__all__ = [
    "Bins",
    "Rerouted",
    "bin_major",
    "bin_thresholds",
    "bin_top_keys",
    "collect_candidates",
    "drop_below",
    "group_kth_keys",
    "group_top_keys",
    "reroute",
    "router_or_score",
    "top_keys",
]
