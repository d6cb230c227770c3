"""Wire a LoadTracker to the plans of every capacity-aware MoE layer of a model."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .tracker import LoadTracker


def _modules(models: Any) -> Iterable[torch.nn.Module]:
    """Modules of a model, a list of model chunks (Megatron), or a DeepSpeedEngine."""
    chunks = models if isinstance(models, (list, tuple)) else [models]
    for chunk in chunks:
        yield from getattr(chunk, "module", chunk).modules()


def attach_megatron(models: Any, tracker: LoadTracker) -> int:
    """Record every capaware MoELayer's plans under its global layer index (layer_number - 1;
    layers built outside a model have none and are numbered in module order).

    Returns the number of layers attached (a pipeline stage sees only its own).
    """
    from ..megatron.dispatcher import CapacityAwareTokenDispatcher

    count = 0
    for module in _modules(models):
        dispatcher = getattr(module, "token_dispatcher", None)
        if isinstance(dispatcher, CapacityAwareTokenDispatcher):
            number = getattr(module, "layer_number", None)
            layer = count if number is None else number - 1
            dispatcher.plan_observers.append(lambda _d, plan, layer=layer: tracker.record(layer, plan))
            count += 1
    return count


def attach_deepspeed(model_or_engine: Any, tracker: LoadTracker) -> int:
    """Record every CapacityAwareGate's plans, layers numbered in module order."""
    from ..deepspeed.gate import CapacityAwareGate

    gates = [m for m in _modules(model_or_engine) if isinstance(m, CapacityAwareGate)]
    for layer, gate in enumerate(gates):
        gate.plan_observers.append(lambda _g, plan, layer=layer: tracker.record(layer, plan))
    return len(gates)
