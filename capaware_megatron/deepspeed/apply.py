"""apply(): swap the gate of every DeepSpeed-MoE layer for the capacity-aware one."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .config import DsConfig, parse_section
from .gate import CapacityAwareGate

logger = logging.getLogger(__name__)


def _module_of(model_or_engine: Any) -> torch.nn.Module:
    module = getattr(model_or_engine, "module", model_or_engine)  # a DeepSpeedEngine wraps .module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a DeepSpeedEngine, got {type(model_or_engine).__name__}")
    return module


def apply(model_or_engine: Any, ds_config: DsConfig) -> list[CapacityAwareGate]:
    """Replace the TopKGate of every deepspeed.moe.layer.MoE with a CapacityAwareGate.

    Works before or after deepspeed.initialize: the new gate reuses the trained router weights
    (the same Parameter), so an engine's optimizer keeps updating them. The layers stay
    deepspeed.moe.layer.MoE instances (the engine recognises MoE layers by that class).
    Returns the new gates, one per MoE layer.
    """
    from deepspeed.moe.layer import MoE

    section = parse_section(ds_config)
    gates = []
    for name, module in _module_of(model_or_engine).named_modules():
        if not isinstance(module, MoE):
            continue
        old = module.deepspeed_moe.gate
        if isinstance(old, CapacityAwareGate):
            gate = old
            gate.capacity_config = section.capacity
        else:
            gate = CapacityAwareGate.from_topk_gate(old, section.capacity)
            module.deepspeed_moe.gate = gate
        gates.append(gate)
        logger.info("capaware: %s uses %s", name or "<root>", section.capacity)
    if not gates:
        raise ValueError("no deepspeed.moe.layer.MoE layer found in the model")
    return gates
