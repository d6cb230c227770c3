"""CapacityConfig <-> Megatron: TransformerConfig attachment and conflict checks."""

from __future__ import annotations

from typing import Any, Optional

from ..config import CapacityConfig

DISPATCHER_TYPE = "capaware"


class CapawareDispatcherType(str):
    """The string "capaware" carrying a layer's CapacityConfig.

    Stored as the TransformerConfig's moe_token_dispatcher_type, it travels with every config
    Megatron derives from it (dataclasses.replace, copy, deepcopy, pickle), where an extra
    attribute on the config would be dropped by replace and leave a layer silently dropless.
    """

    capacity_config: CapacityConfig

    def __new__(cls, capacity_config: CapacityConfig) -> "CapawareDispatcherType":
        value = super().__new__(cls, DISPATCHER_TYPE)
        value.capacity_config = capacity_config
        return value

    def __reduce__(self):
        return (CapawareDispatcherType, (self.capacity_config,))

    def __copy__(self) -> "CapawareDispatcherType":
        return self  # immutable: a frozen CapacityConfig

    def __deepcopy__(self, memo: dict) -> "CapawareDispatcherType":
        return self


_default: Optional[CapacityConfig] = None


def set_capacity_config(transformer_config: Any, cfg: CapacityConfig) -> None:
    """Give a TransformerConfig with moe_token_dispatcher_type="capaware" its CapacityConfig."""
    if not isinstance(cfg, CapacityConfig):
        raise TypeError(f"expected a CapacityConfig, got {type(cfg).__name__}")
    dispatcher = getattr(transformer_config, "moe_token_dispatcher_type", None)
    if dispatcher != DISPATCHER_TYPE:
        raise ValueError(
            f"set_capacity_config needs moe_token_dispatcher_type={DISPATCHER_TYPE!r}, got {dispatcher!r}"
        )
    transformer_config.moe_token_dispatcher_type = CapawareDispatcherType(cfg)


def set_default_capacity_config(cfg: Optional[CapacityConfig]) -> None:
    """The CapacityConfig of layers whose TransformerConfig carries none (set from the CLI)."""
    global _default
    _default = cfg


def capacity_config_of(transformer_config: Any, dispatcher_type: Optional[str] = None) -> CapacityConfig:
    """The layer's CapacityConfig (carried by its dispatcher type, else the CLI default, else
    dropless), checked against Megatron's own capacity settings."""
    if dispatcher_type is None:
        dispatcher_type = getattr(transformer_config, "moe_token_dispatcher_type", None)
    attached = getattr(dispatcher_type, "capacity_config", None)
    cfg = attached or _default or CapacityConfig()
    check_megatron_conflicts(transformer_config)
    return cfg


def check_megatron_conflicts(transformer_config: Any) -> None:
    """Megatron's own capacity drop must not run underneath the capacity-aware plan, and no
    Megatron mode may swap the capaware dispatcher out (a silently dropless layer)."""
    if getattr(transformer_config, "transformer_impl", None) == "inference_optimized":
        raise ValueError(
            "transformer_impl='inference_optimized' (--transformer-impl inference_optimized) "
            "replaces a MoE layer's dispatcher by Megatron's all-gather inference dispatchers "
            "at every forward, which would bypass the capaware plan; capaware supports "
            "transformer_impl 'local' and 'transformer_engine' (eager prefill, and CUDA-graph "
            "decode with --moe-pad-experts-for-cuda-graph-inference)"
        )
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
