"""DeepSpeed-MoE plugin: the capacity-aware gate, configured from the DeepSpeed config JSON.

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    capaware_megatron.deepspeed.apply(engine, ds_config)   # or on the model, before initialize

DeepSpeed is imported lazily: importing this package needs only torch.
"""

from .config import SECTION, CapacityAwareSection, parse_section

__all__ = ["SECTION", "CapacityAwareGate", "CapacityAwareSection", "apply", "parse_section"]


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "capaware_megatron.deepspeed needs deepspeed: pip install 'capaware_megatron[deepspeed]'"
        ) from err


def apply(model_or_engine, ds_config):
    _require_deepspeed()
    from .apply import apply as _apply

    return _apply(model_or_engine, ds_config)


apply.__doc__ = "Swap every DeepSpeed-MoE gate for a CapacityAwareGate (see apply.apply)."


def __getattr__(name: str):
    if name == "CapacityAwareGate":
        _require_deepspeed()
        from .gate import CapacityAwareGate

        return CapacityAwareGate
    raise AttributeError(name)
