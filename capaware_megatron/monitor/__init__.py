"""Load-imbalance monitor: per layer, per expert and per EP rank, before and after the plan.

    tracker = LoadTracker(num_layers, num_experts, expert_to_rank, interval=10,
                          sinks=[ConsoleSink(), WandbSink(project="moe", mode="offline")])
    attach_megatron(model, tracker)      # or attach_deepspeed(engine, tracker)
    ... each training / inference step: tracker.step(iteration)

wandb and tensorboard are imported only when a sink first writes.
"""

from .attach import attach_deepspeed, attach_megatron
from .sinks import (
    ConsoleSink,
    DeepSpeedMonitorSink,
    JsonlSink,
    TensorBoardSink,
    WandbSink,
    megatron_sinks,
)
from .tracker import LoadTracker

__all__ = [
    "ConsoleSink",
    "DeepSpeedMonitorSink",
    "JsonlSink",
    "LoadTracker",
    "TensorBoardSink",
    "WandbSink",
    "attach_deepspeed",
    "attach_megatron",
    "megatron_sinks",
]
