"""Load monitoring inside Megatron-LM's loops (the run wrapper installs it).

With --capaware-log-interval N > 0 every capaware layer of the model that
Megatron-LM builds (``setup_model_and_optimizer`` in training, from a model provider or a
ModelConfig; ``get_model`` in the inference scripts) reports to three LoadTrackers, one per phase, so no phase's plans leak into
another's report:
- training: every N train_step calls, at Megatron's own iteration (the one it logs, also after a
  resume), keys ``capaware/...``;
- evaluation: once per evaluation pass (evaluate_and_print_results, --skip-train too), at that
  iteration, keys ``capaware/eval/...`` (validation sets) and ``capaware/test/...`` (the test
  set, --do-test);
- inference: every N forward passes outside those two (the text-generation scripts), keys
  ``capaware/inference/...`` for eager passes (prefill) and ``capaware/decode/...`` for the passes
  Megatron's controller runs padded for CUDA graphs (set_decode_expert_padding), numbered by
  forward pass. Under CUDA graphs the counts accumulate in the trackers' persistent buffers on
  replay; the passes are counted by a forward hook of the model, which runs unless the whole
  iteration is captured (--cuda-graph-scope full_iteration_inference).
Reports go through Megatron-LM's own TensorBoard / W&B writers, which live on the last rank, and
the console.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..monitor import ConsoleSink, LoadTracker, megatron_sinks
from .install import _replace

PHASES = {"train": "capaware", "eval": "capaware/eval", "test": "capaware/test",
          "inference": "capaware/inference", "decode": "capaware/decode"}
EVALUATION_PHASES = ("eval", "test")


def attach_megatron(models: Any, tracker: Any) -> int:
    """Record every capaware MoELayer's plans in `tracker` (anything with ``record(layer, plan)``)
    under its global layer index (layer_number - 1; layers built outside a model have none and
    are numbered in module order). Returns the number of layers attached (a pipeline stage sees
    only its own)."""
    count = 0
    for module, dispatcher in _capaware_layers(models):
        number = getattr(module, "layer_number", None)
        layer = count if number is None else number - 1
        dispatcher.plan_observers.append(lambda _d, plan, layer=layer: tracker.record(layer, plan))
        count += 1
    return count


def _capaware_layers(models: Any) -> Iterator[tuple[torch.nn.Module, Any]]:
    """(MoE layer, its CapacityAwareTokenDispatcher) of a model or of a list of model chunks
    (DDP-wrapped or not), in module order."""
    from .dispatcher import CapacityAwareTokenDispatcher

    chunks = models if isinstance(models, (list, tuple)) else [models]
    for chunk in chunks:
        for module in getattr(chunk, "module", chunk).modules():
            dispatcher = getattr(module, "token_dispatcher", None)
            if isinstance(dispatcher, CapacityAwareTokenDispatcher):
                yield module, dispatcher


class PhaseMonitor:
    """One LoadTracker per phase; plans go to the tracker of the phase running now."""

    def __init__(self, trackers: dict[str, LoadTracker]) -> None:
        self.trackers = trackers
        self.phase = "inference"  # until a train_step or an evaluation pass runs
        self.forward_passes = 0
        self.dispatchers: list[Any] = []  # the monitored layers' dispatchers

    def _phase_now(self) -> str:
        """The phase, inference split into eager passes and padded (CUDA-graph decode) ones:
        Megatron's controller switches every MoE layer at once."""
        if self.phase == "inference" and self.dispatchers and self.dispatchers[0].drop_and_pad:
            return "decode"
        return self.phase

    def record(self, layer: int, plan: Any) -> None:
        self.trackers[self._phase_now()].record(layer, plan)

    def after_forward(self, *_: Any) -> None:
        """Forward hook of the model's first chunk: outside training and evaluation each pass
        is an inference step (prefill or decode), numbered by forward pass."""
        if self.phase == "inference":
            self.forward_passes += 1
            self.trackers[self._phase_now()].step(self.forward_passes)


def tracker_from_args(args: Any) -> Optional[PhaseMonitor]:
    """The PhaseMonitor configured by --capaware-log-interval / --capaware-log-per-expert."""
    interval = getattr(args, "capaware_log_interval", 0)
    if not interval:
        return None
    num_experts = args.num_experts
    per_rank = num_experts // args.expert_model_parallel_size
    # Megatron-LM's TensorBoard and W&B writers exist on the last rank only.
    log_rank = dist.get_world_size() - 1 if dist.is_available() and dist.is_initialized() else 0
    sinks = [*megatron_sinks(), ConsoleSink()]
    return PhaseMonitor({
        phase: LoadTracker(
            num_layers=args.num_layers, num_experts=num_experts,
            expert_to_rank=torch.arange(num_experts) // per_rank,
            interval=0 if phase in EVALUATION_PHASES else interval, sinks=sinks, log_rank=log_rank,
            per_expert=args.capaware_log_per_expert, prefix=prefix,
        )
        for phase, prefix in PHASES.items()
    })


_state: dict[str, Any] = {}  # "args": the parsed arguments; "monitor": the PhaseMonitor


def configure_monitor(args: Any) -> None:
    """Called with Megatron's parsed arguments (every parse: the last one wins)."""
    _state["args"] = args


@contextlib.contextmanager
def _in_phase(phase: str) -> Iterator[Optional[PhaseMonitor]]:
    """Route plans to `phase`'s tracker for a block; yields the monitor (None: not monitoring)."""
    monitor = _state.get("monitor")
    if monitor is None:
        yield None
        return
    monitor.phase = phase
    try:
        yield monitor
    finally:
        monitor.phase = "inference"


def install_monitor_hooks() -> None:
    """Wrap get_model, setup_model_and_optimizer, train_step and evaluate_and_print_results of
    megatron.training before the script imports them; they act only once
    --capaware-log-interval is parsed."""
    import megatron.training
    from megatron.training import training

    get_model = _then_monitor(training.get_model, lambda model: model)
    _replace(training, "get_model", get_model)
    _replace(megatron.training, "get_model", get_model)
    # The ModelConfig path (Megatron-LM's pretrain_gpt.py) builds without get_model.
    _replace(training, "setup_model_and_optimizer",
             _then_monitor(training.setup_model_and_optimizer, lambda built: built[0]))
    _replace(training, "train_step", _in_phase_then(training.train_step, _training, _report_training))
    _replace(training, "evaluate_and_print_results",
             _in_phase_then(training.evaluate_and_print_results, _evaluation_phase,
                            _report_evaluation))


def _then_monitor(build: Any, model_of: Any) -> Any:
    """`build`, then its model (``model_of(result)``) attached to the process's PhaseMonitor,
    once per model."""

    @functools.wraps(build)
    def wrapped(*args: Any, **kwargs: Any):
        built = build(*args, **kwargs)
        monitor = _state.get("monitor") or tracker_from_args(_state.get("args"))
        model = model_of(built)
        first = model[0] if isinstance(model, (list, tuple)) else model
        if monitor is not None and getattr(first, "_capaware_monitor", None) is not monitor:
            attach_megatron(model, monitor)
            monitor.dispatchers.extend(dispatcher for _, dispatcher in _capaware_layers(model))
            first.register_forward_hook(monitor.after_forward)
            first._capaware_monitor = monitor
            _state["monitor"] = monitor
        return built

    return wrapped


def _training(args: tuple, kwargs: dict) -> str:
    return "train"


def _evaluation_phase(args: tuple, kwargs: dict) -> str:
    """evaluate_and_print_results(prefix, ...): Megatron names the test pass 'on test set'."""
    prefix = kwargs.get("prefix", args[0] if args else "")
    return "test" if "test set" in str(prefix) else "eval"


def _in_phase_then(function: Any, phase_of: Any, report: Any) -> Any:
    """`function` running in the phase ``phase_of(args, kwargs)``, then
    ``report(monitor, phase, args, kwargs)`` when monitoring."""

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any):
        phase = phase_of(args, kwargs)
        with _in_phase(phase) as monitor:
            out = function(*args, **kwargs)
        if monitor is not None:
            report(monitor, phase, args, kwargs)
        return out

    return wrapped


def _report_training(monitor: PhaseMonitor, phase: str, args: tuple, kwargs: dict) -> None:
    """After train_step: Megatron logs the iteration it passed in, plus one."""
    iteration = kwargs.get("iteration")
    monitor.trackers[phase].step(None if iteration is None else iteration + 1)


def _report_evaluation(monitor: PhaseMonitor, phase: str, args: tuple, kwargs: dict) -> None:
    """After evaluate_and_print_results(prefix, forward_step, data, model, iteration, ...): the
    whole pass is one step of its phase's tracker (interval 0), reported once."""
    iteration = kwargs.get("iteration", args[4] if len(args) > 4 else None)
    monitor.trackers[phase].step(iteration)
    monitor.trackers[phase].flush(iteration)
