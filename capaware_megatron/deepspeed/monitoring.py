"""A LoadTracker for DeepSpeed-MoE from the "capacity_aware.log" part of the config JSON."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..monitor import (
    ConsoleSink,
    DeepSpeedMonitorSink,
    JsonlSink,
    LoadTracker,
    TensorBoardSink,
    WandbSink,
)
from .config import DsConfig, parse_section


def tracker_from_ds_config(model_or_engine: Any, ds_config: DsConfig, **wandb_init: Any) -> Optional[LoadTracker]:
    """Attach a LoadTracker to every CapacityAwareGate, configured by "capacity_aware.log".

    None when log.interval is 0. Sinks: the console; DeepSpeed's own monitor when the engine has
    one enabled (its "tensorboard" / "wandb" / "csv_monitor" sections); otherwise W&B
    (`wandb_init` goes to wandb.init) and TensorBoard as the flags say; a JSON-lines file when
    log.jsonl names one. Call ``tracker.step()`` once per training / inference step.
    """
    from .gate import CapacityAwareGate

    log = parse_section(ds_config).log
    if not log["interval"]:
        return None
    module = getattr(model_or_engine, "module", model_or_engine)
    gates = [m for m in module.modules() if isinstance(m, CapacityAwareGate)]
    if not gates:
        raise ValueError("no CapacityAwareGate in the model: call capaware_megatron.deepspeed.apply first")
    num_experts = gates[0].num_experts
    ep_size = gates[0]._ep()[1]
    sinks: list[Any] = [ConsoleSink()]
    monitor = getattr(model_or_engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        sinks.append(DeepSpeedMonitorSink(monitor))
    else:
        if log["wandb"]:
            sinks.append(WandbSink(**wandb_init))
        if log["tensorboard"]:
            sinks.append(TensorBoardSink())
    if log["jsonl"]:
        sinks.append(JsonlSink(log["jsonl"]))
    tracker = LoadTracker(
        num_layers=len(gates), num_experts=num_experts,
        expert_to_rank=torch.arange(num_experts) // (num_experts // ep_size),
        interval=log["interval"], sinks=sinks, per_expert=log["per_expert"],
    )
    attach_deepspeed(model_or_engine, tracker)
    return tracker


def attach_deepspeed(model_or_engine: Any, tracker: Any) -> int:
    """Record every CapacityAwareGate's plans in `tracker` (anything with ``record(layer,
    plan)``), layers numbered in module order. Returns the number of gates attached."""
    from .gate import CapacityAwareGate

    module = getattr(model_or_engine, "module", model_or_engine)  # a DeepSpeedEngine wraps .module
    gates = [m for m in module.modules() if isinstance(m, CapacityAwareGate)]
    for layer, gate in enumerate(gates):
        gate.plan_observers.append(lambda _g, plan, layer=layer: tracker.record(layer, plan))
    return len(gates)
