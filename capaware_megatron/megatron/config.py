"""CapacityConfig <-> Megatron: TransformerConfig attachment and conflict checks."""

from __future__ import annotations

from typing import Any, Optional

from ..config import CapacityConfig

DISPATCHER_TYPE = "capaware"
ATTRIBUTE = "capaware"
"""TransformerConfig attribute holding the CapacityConfig of a model built in code."""

_default: Optional[CapacityConfig] = None


def set_capacity_config(transformer_config: Any, cfg: CapacityConfig) -> None:
    """Attach ``cfg`` to a TransformerConfig (models built in code)."""
    if not isinstance(cfg, CapacityConfig):
        raise TypeError(f"expected a CapacityConfig, got {type(cfg).__name__}")
    setattr(transformer_config, ATTRIBUTE, cfg)


def set_default_capacity_config(cfg: Optional[CapacityConfig]) -> None:
    """The CapacityConfig of layers whose TransformerConfig carries none (set from the CLI)."""
    global _default
    _default = cfg


def capacity_config_of(transformer_config: Any) -> CapacityConfig:
    """The layer's CapacityConfig, checked against Megatron's own capacity settings."""
    cfg = getattr(transformer_config, ATTRIBUTE, None) or _default or CapacityConfig()
    check_megatron_conflicts(transformer_config)
    return cfg


def check_megatron_conflicts(transformer_config: Any) -> None:
    """Megatron's own capacity drop must not run underneath the capacity-aware plan."""
    factor = getattr(transformer_config, "moe_expert_capacity_factor", None)
    if factor is not None:
        raise ValueError(
            f"moe_expert_capacity_factor={factor} (--moe-expert-capacity-factor) makes "
            "Megatron-Core's router drop tokens before the capaware dispatcher plans them; "
            "unset it and use --capaware-capacity-factor instead"
        )
    if getattr(transformer_config, "moe_pad_expert_input_to_capacity", False):
        raise ValueError(
            "moe_pad_expert_input_to_capacity (--moe-pad-expert-input-to-capacity) is not "
            "supported with --moe-token-dispatcher-type capaware"
        )
