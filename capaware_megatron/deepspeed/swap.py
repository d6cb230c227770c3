"""apply(): swap the gate of every DeepSpeed-MoE layer for the capacity-aware one.

Two kinds of layer carry a DeepSpeed ``TopKGate``:
- ``deepspeed.moe.layer.MoE`` (training and ``deepspeed.initialize``): ``.deepspeed_moe.gate``;
- ``DeepSpeedMoEInference`` (``deepspeed.init_inference`` v1, its CUDA inference ops):
  ``.moe_gate``, whose dense ``(l_aux, combine_weights, dispatch_mask, counts)`` output the new
  gate returns unchanged in form.

All-or-nothing: every layer's new gate is built (and checked) before the first one is swapped in,
so a layer that cannot take the configuration leaves the whole model as it was.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from ..calibrate import ExpertShape, device_name, dtype_name, resolve_min_capacity
from ..config import CapacityConfig
from .config import DsConfig, parse_section
from .gate import CapacityAwareGate

logger = logging.getLogger(__name__)

IGNORED_GATE_SETTINGS = ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens", "use_rts")
"""DeepSpeed's own capacity settings, which no longer act once the capacity-aware gate plans."""


@dataclass(frozen=True)
class _GateSite:
    """Where one layer holds its gate: ``owner.<attribute>``, and that layer's defaults."""

    name: str
    owner: torch.nn.Module
    attribute: str
    defaults: Mapping[str, Any]
    ep_group: Any

    @property
    def gate(self) -> Any:
        return getattr(self.owner, self.attribute)


def _module_of(model_or_engine: Any) -> torch.nn.Module:
    module = getattr(model_or_engine, "module", model_or_engine)  # a DeepSpeedEngine wraps .module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a DeepSpeedEngine, got {type(model_or_engine).__name__}")
    return module


def _init_defaults(cls: type) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {name: parameters[name].default for name in IGNORED_GATE_SETTINGS if name in parameters}


def _inference_layer() -> tuple[type, dict[str, Any]] | None:
    """(DeepSpeedMoEInference, its config defaults), or None where DeepSpeed cannot import it."""
    try:
        from deepspeed.ops.transformer.inference.moe_inference import (
            DeepSpeedMoEInference,
            DeepSpeedMoEInferenceConfig,
        )
    except Exception:  # noqa: BLE001 - any import failure means no such layer can exist here
        return None
    return DeepSpeedMoEInference, _init_defaults(DeepSpeedMoEInferenceConfig)


def _gate_sites(module: torch.nn.Module) -> Iterator[_GateSite]:
    from deepspeed.moe.layer import MoE

    moe_defaults = _init_defaults(MoE)
    inference = _inference_layer()
    for name, layer in module.named_modules():
        name = name or "<root>"
        if isinstance(layer, MoE):
            moe = layer.deepspeed_moe
            yield _GateSite(name, moe, "gate", moe_defaults, moe.gate.ep_group)
        elif inference is not None and isinstance(layer, inference[0]):
            # DeepSpeedMoEInference builds its TopKGate before it stores ep_group: take the layer's.
            yield _GateSite(name, layer, "moe_gate", inference[1], getattr(layer, "ep_group", None))


def _new_gate(site: _GateSite, capacity: CapacityConfig) -> CapacityAwareGate:
    """The gate this site will hold; raises naming the layer when it cannot take the config."""
    old = site.gate
    if isinstance(old, CapacityAwareGate):  # applied before: re-configured in place
        return old
    try:
        return CapacityAwareGate.from_topk_gate(old, capacity, ep_group=site.ep_group)
    except (TypeError, ValueError) as err:
        raise type(err)(f"DeepSpeed MoE layer {site.name!r}: {err}") from err


def _warn_ignored(sites: list[_GateSite]) -> None:
    changed = []
    for site in sites:
        gate = site.gate
        if isinstance(gate, CapacityAwareGate):
            continue
        for setting, default in site.defaults.items():
            value = getattr(gate, setting, default)
            if value != default:
                changed.append(f"{site.name}.{setting}={value!r}")
    if changed:
        warnings.warn(
            "capaware: DeepSpeed's own capacity settings no longer act once the capacity-aware "
            f"gate plans (set the \"capacity_aware\" section instead): {', '.join(changed)}",
            UserWarning,
            stacklevel=3,
        )


def apply(model_or_engine: Any, ds_config: DsConfig) -> list[CapacityAwareGate]:
    """Replace the TopKGate of every DeepSpeed-MoE layer with a CapacityAwareGate.

    Works before or after deepspeed.initialize (and on a deepspeed.init_inference v1 model):
    the new gate reuses the trained router weights (the same Parameter), so an engine's optimizer
    keeps updating them. The layers keep their classes (the engine recognises MoE layers by them).
    Calling it again re-configures the gates already swapped. Returns the gates, one per layer.

    Raises (leaving every layer as it was): ValueError for a bad section or a layer that cannot
    take it (the message names the layer), or when the model has no DeepSpeed MoE layer.
    """
    section = parse_section(ds_config)
    sites = list(_gate_sites(_module_of(model_or_engine)))
    if not sites:
        raise ValueError("no DeepSpeed MoE layer (deepspeed.moe.layer.MoE or DeepSpeedMoEInference) in the model")
    capacities = [_layer_capacity(site, section.capacity) for site in sites]
    gates = [_new_gate(site, capacity) for site, capacity in zip(sites, capacities)]
    _warn_ignored(sites)
    for site, gate, capacity in zip(sites, gates, capacities):
        gate.capacity_config = capacity
        setattr(site.owner, site.attribute, gate)
        logger.info("capaware: %s uses %s", site.name, capacity)
    return gates


def _layer_capacity(site: _GateSite, capacity: CapacityConfig) -> CapacityConfig:
    """The section's configuration with a calibrated min_capacity ("auto" / a file) resolved
    for this layer's experts: hidden and FFN from the first torch.nn.Linear of its expert."""
    if isinstance(capacity.min_capacity, int):
        return capacity
    experts = getattr(getattr(site.owner, "experts", None), "deepspeed_experts", None)
    linear = next((m for m in experts[0].modules() if isinstance(m, torch.nn.Linear)), None) if experts else None
    if linear is None:
        raise ValueError(
            f"DeepSpeed MoE layer {site.name!r}: min_capacity={capacity.min_capacity!r} needs the "
            "layer's expert shape (a torch.nn.Linear in its expert); give min_capacity as an int")
    try:
        shape = ExpertShape(linear.in_features, linear.out_features, dtype_name(linear.weight.dtype), len(experts))
        return resolve_min_capacity(capacity, shape, device_name(linear.weight.device))
    except (LookupError, OSError, ValueError) as err:
        raise type(err)(f"DeepSpeed MoE layer {site.name!r}: {err}") from err
