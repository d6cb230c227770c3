"""Megatron-Core plugin: the `capaware` token dispatcher and its Megatron-LM arguments.

    import capaware_megatron.megatron as capaware
    capaware.install()                                   # once, before building the model
    config = TransformerConfig(..., moe_token_dispatcher_type="capaware")
    capaware.set_capacity_config(config, CapacityConfig(capacity_factor=1.5))

Unmodified Megatron-LM scripts: `python -m capaware_megatron.megatron.run SCRIPT.py ARGS`.
Megatron-Core is imported lazily: importing this package needs only torch.
"""

from .arguments import add_capaware_args, capacity_config_from_args, validate_capaware_args
from .config import DISPATCHER_TYPE, set_capacity_config, set_default_capacity_config
from .install import install, installed, is_installed, uninstall

__all__ = [
    "CapacityAwareTokenDispatcher",
    "attach_megatron",
    "DISPATCHER_TYPE",
    "add_capaware_args",
    "capacity_config_from_args",
    "install",
    "installed",
    "is_installed",
    "set_capacity_config",
    "set_default_capacity_config",
    "uninstall",
    "validate_capaware_args",
]


def __getattr__(name: str):
    if name == "attach_megatron":
        from .monitoring import attach_megatron

        return attach_megatron
    if name == "CapacityAwareTokenDispatcher":
        from ._compat import require_megatron_core

        require_megatron_core()
        from .dispatcher import CapacityAwareTokenDispatcher

        return CapacityAwareTokenDispatcher
    raise AttributeError(name)
