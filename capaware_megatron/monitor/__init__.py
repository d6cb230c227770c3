"""Load-imbalance monitor: per layer, per expert and per EP rank, before and after the plan.

    tracker = LoadTracker(num_layers, num_experts, expert_to_rank, interval=10,
                          sinks=[ConsoleSink(), WandbSink(project="moe", mode="offline")])
    capaware_megatron.megatron.attach_megatron(model, tracker)   # or ...deepspeed.attach_deepspeed
    ... each training / inference step: tracker.step(iteration)

wandb and tensorboard are imported only when a sink first writes.
"""

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
    "megatron_sinks",
]
