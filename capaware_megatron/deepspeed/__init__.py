"""DeepSpeed-MoE plugin: the capacity-aware gate, configured from the DeepSpeed config JSON.

    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    capaware_megatron.deepspeed.apply(engine, ds_config)   # or on the model, before initialize

DeepSpeed is imported lazily: importing this package needs only torch.
"""

from .config import SECTION, CapacityAwareSection, parse_section

__all__ = [
    "SECTION",
    "CapacityAwareGate",
    "CapacityAwareSection",
    "apply",
    "attach_deepspeed",
    "parse_section",
    "tracker_from_ds_config",
]


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "capaware_megatron.deepspeed needs deepspeed: pip install 'capaware_megatron[deepspeed]'"
        ) from err


def apply(model_or_engine, ds_config):
    _require_deepspeed()
    from .swap import apply as _apply

    return _apply(model_or_engine, ds_config)


apply.__doc__ = "Swap every DeepSpeed-MoE gate for a CapacityAwareGate (see swap.apply)."


def tracker_from_ds_config(model_or_engine, ds_config, **wandb_init):
    _require_deepspeed()
    from .monitoring import tracker_from_ds_config as _tracker

    return _tracker(model_or_engine, ds_config, **wandb_init)


tracker_from_ds_config.__doc__ = "A LoadTracker from the config's capacity_aware.log (see monitoring)."


def attach_deepspeed(model_or_engine, tracker) -> int:
    _require_deepspeed()
    from .monitoring import attach_deepspeed as _attach

    return _attach(model_or_engine, tracker)


attach_deepspeed.__doc__ = "Record every CapacityAwareGate's plans in a LoadTracker (see monitoring)."


def __getattr__(name: str):
    if name == "CapacityAwareGate":
        _require_deepspeed()
        from .gate import CapacityAwareGate

        return CapacityAwareGate
    raise AttributeError(name)
