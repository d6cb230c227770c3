"""Capacity-aware MoE inference (arXiv 2503.05066) for Megatron-Core and DeepSpeed-MoE.

The core (this package's top level) imports only torch; the framework plugins live in
``capaware_megatron.megatron``, ``capaware_megatron.deepspeed`` and ``capaware_megatron.monitor``,
the Triton kernels in ``capaware_megatron.kernels``.
"""

from .config import CapacityConfig, expert_capacity
from .group import RoutingGroup
from .layout import ExpertLayout
from .planner import RoutingPlan, plan_routing

__all__ = ["CapacityConfig", "ExpertLayout", "RoutingGroup", "RoutingPlan", "expert_capacity", "plan_routing"]
__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)
