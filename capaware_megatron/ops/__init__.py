"""The torch backend of the plan: twins of the Triton kernels (routing_plan) and the bounded
reroute rounds (reroute), the CPU path and the reference the kernels are tested against."""

from .reroute import Rerouted, reroute
from .routing_plan import (
    CandidateItems,
    bin_items,
    bin_thresholds,
    bin_top_keys,
    collect_candidates,
    drop_below,
    expert_bins,
    group_top_keys,
    kth_largest,
    kth_of_top,
    listed,
    router_or_score,
    top_keys,
    top_keys_per_bin,
)

__all__ = [
    "CandidateItems",
    "Rerouted",
    "bin_items",
    "bin_thresholds",
    "bin_top_keys",
    "collect_candidates",
    "drop_below",
    "expert_bins",
    "group_top_keys",
    "kth_largest",
    "kth_of_top",
    "listed",
    "reroute",
    "router_or_score",
    "top_keys",
    "top_keys_per_bin",
]
