"""Load monitoring inside megatron.training's loop (used by the run wrapper).

--capaware-log-interval N > 0 attaches a LoadTracker to the model that
setup_model_and_optimizer returns and closes a step after every train_step; it reports through
Megatron-LM's own TensorBoard / W&B writers (and the console).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from ..monitor import ConsoleSink, LoadTracker, attach_megatron, megatron_sinks
from .install import _replace


def tracker_from_args(args: Any) -> Optional[LoadTracker]:
    """A LoadTracker configured by --capaware-log-interval / --capaware-log-per-expert."""
    interval = getattr(args, "capaware_log_interval", 0)
    if not interval:
        return None
    num_experts = args.num_experts
    per_rank = num_experts // args.expert_model_parallel_size
    return LoadTracker(
        num_layers=args.num_layers,
        num_experts=num_experts,
        expert_to_rank=torch.arange(num_experts) // per_rank,
        interval=interval,
        sinks=[*megatron_sinks(), ConsoleSink()],
        per_expert=args.capaware_log_per_expert,
    )


def install_monitor_hooks(args: Any) -> None:
    """Wrap megatron.training.training's setup_model_and_optimizer and train_step."""
    if not getattr(args, "capaware_log_interval", 0):
        return
    from megatron.training import training

    state: dict[str, LoadTracker] = {}
    setup = training.setup_model_and_optimizer
    train_step = training.train_step

    @functools.wraps(setup)
    def setup_model_and_optimizer(*a, **kw):
        result = setup(*a, **kw)
        tracker = tracker_from_args(args)
        attach_megatron(result[0], tracker)
        state["tracker"] = tracker
        return result

    @functools.wraps(train_step)
    def step(*a, **kw):
        out = train_step(*a, **kw)
        if "tracker" in state:
            state["tracker"].step(getattr(args, "curr_iteration", None))
        return out

    _replace(training, "setup_model_and_optimizer", setup_model_and_optimizer)
    _replace(training, "train_step", step)
