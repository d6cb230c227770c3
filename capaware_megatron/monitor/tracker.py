"""LoadTracker: accumulate plan statistics on device, reduce and report once per logging step.

Per step every MoE layer adds one row of counts (loads per expert before and after the plan,
dropped, rerouted and routed assignments, capacity and its floor) to a [layers, fields] tensor
on the plan's device: no host sync. That tensor is persistent (a step copies it out and zeroes it in place), so
the additions a CUDA graph captured keep landing in it on every replay, with no Python running.
A logging step stacks the steps since the last one, sums them over the process group with one
all_reduce, and turns them into statistics on the logging rank.

Loads are summed over every rank of the group (data, tensor, expert and pipeline parallel): the
statistics describe the whole job's batch per step. Ratios (straggler factors, fractions,
speedups) are unchanged when ranks hold duplicate tokens (tensor parallelism without sequence
parallelism); absolute token counts are then multiplied by the duplication.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..planner import RoutingPlan
from ..stats import load_stats

# Extra fields after the [E] before / [E] after loads of a layer's row.
_DROPPED, _REROUTED, _ROUTED, _CAPACITY, _FLOOR, _RECORDS = range(6)
_EXTRA = 6
# LoadStats fields reported per layer (and averaged over layers).
_REPORTED = (
    "straggler_expert_before", "straggler_expert_after", "straggler_rank_before",
    "straggler_rank_after", "cv_before", "cv_after", "speedup_expert", "speedup_rank",
    "dropped_fraction", "rerouted_fraction", "capacity",
)


class LoadTracker:
    """Collects RoutingPlans per layer and step; reports every `interval` steps to `sinks`.

    Args:
        num_layers: MoE layer slots (global layer indices 0..num_layers-1, the same on every rank,
            also when pipeline stages hold different layers).
        num_experts: E.
        expert_to_rank: [E] EP rank of each expert (per-device statistics).
        interval: report every `interval` calls of step(); 0 never reports by itself.
        sinks: objects with ``log(metrics, step, loads)`` (see monitor.sinks); a sink with a
            ``bind(tracker)`` method is handed this tracker once (its layout: expert_to_rank).
        group: process group to reduce over (None: the default group, when initialised).
        log_rank: the rank (in `group`) that writes to the sinks.
        per_expert: also hand per-expert loads (layer x expert) to the sinks.
        device: where counts accumulate (default: the current CUDA device, else CPU); the
            same kind on every rank, as the collective needs.
        prefix: the metrics' key prefix ("capaware"; e.g. "capaware/eval" for evaluation).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        expert_to_rank: Optional[Sequence[int] | torch.Tensor] = None,
        interval: int = 1,
        sinks: Iterable[Any] = (),
        group: Any = None,
        log_rank: int = 0,
        per_expert: bool = False,
        device: Any = None,
        prefix: str = "capaware",
    ) -> None:
        if num_layers < 1 or num_experts < 1:
            raise ValueError(f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}")
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.num_layers, self.num_experts = num_layers, num_experts
        mapping = torch.arange(num_experts) if expert_to_rank is None else torch.as_tensor(expert_to_rank)
        if mapping.shape != (num_experts,):
            raise ValueError(f"expert_to_rank must have {num_experts} entries, got {tuple(mapping.shape)}")
        self.expert_to_rank = mapping.long()
        self.interval = interval
        self.sinks = list(sinks)
        for sink in self.sinks:
            if hasattr(sink, "bind"):
                sink.bind(self)
        self.group = group
        self.log_rank = log_rank
        self.per_expert = per_expert
        self.prefix = prefix
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # [layers, 2E + 6] counts of the current step (persistent: see the module docstring).
        self._current = torch.zeros(
            num_layers, 2 * num_experts + _EXTRA, dtype=torch.float64, device=self.device
        )
        self._history: list[torch.Tensor] = []
        self._steps = 0

    # -------------------------------------------------------------------------------- recording

    def record(self, layer: int, plan: RoutingPlan) -> None:
        """Add one plan of `layer` (0-based) to the current step. Device ops only."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if plan.tokens_per_expert_before.shape != (self.num_experts,):
            raise ValueError(
                f"plan has {plan.tokens_per_expert_before.numel()} experts, tracker {self.num_experts}"
            )
        before = plan.tokens_per_expert_before.to(self.device, non_blocking=True)
        after = plan.tokens_per_expert_after.to(self.device, non_blocking=True)
        counts = torch.stack([plan.num_dropped, plan.num_rerouted]).to(self.device, non_blocking=True)
        row = self._current[layer]
        row[: self.num_experts] += before
        row[self.num_experts : 2 * self.num_experts] += after
        extra = row[2 * self.num_experts :]
        extra[_DROPPED : _REROUTED + 1] += counts
        extra[_ROUTED] += before.sum()
        capacity = plan.capacity  # a host int, or a 0-dim tensor (global scope, eager)
        if isinstance(capacity, torch.Tensor):
            capacity = capacity.to(self.device, non_blocking=True)
        extra[_CAPACITY] += capacity
        extra[_FLOOR] += plan.capacity_floor
        extra[_RECORDS] += 1

    def step(self, iteration: Optional[int] = None) -> Optional[dict[str, float]]:
        """Close the current step; on a logging step reduce, report and return the metrics."""
        self._steps += 1
        iteration = self._steps if iteration is None else iteration
        self._history.append(self._current.clone())
        self._current.zero_()  # in place: captured graphs keep adding into this buffer
        if self.interval and self._steps % self.interval == 0:
            return self.flush(iteration)
        return None

    # -------------------------------------------------------------------------------- reporting

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def flush(self, iteration: int) -> Optional[dict[str, float]]:
        """Reduce the steps since the last report (one collective) and report from log_rank.

        Every rank of the group must call it at the same step (step() does).
        """
        if not self._history:
            return None
        # [steps, layers, fields]: equal on every rank (each calls step() once per step; a
        # pipeline stage contributes zeros for the layers it does not hold).
        history = torch.stack(self._history)
        self._history = []
        if self._distributed():
            dist.all_reduce(history, group=self.group)
            if dist.get_rank(self.group) != self.log_rank:
                return None
        metrics, loads = self._statistics(history.cpu())
        for sink in self.sinks:
            sink.log(metrics, iteration, loads if self.per_expert else None)
        return metrics

    def _statistics(self, history: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """history [S, L, 2E + 6] (summed over ranks) -> scalar metrics and per-expert loads."""
        num_experts = self.num_experts
        metrics: dict[str, float] = {}
        per_layer: dict[str, list[float]] = {}
        load_before, load_after = [], []
        totals = torch.zeros(_EXTRA, dtype=torch.float64)
        for layer in range(self.num_layers):
            rows = history[:, layer]
            rows = rows[rows[:, 2 * num_experts + _RECORDS] > 0]
            if rows.shape[0] == 0:
                continue
            layer_metrics = self._layer_metrics(rows)
            for name, value in layer_metrics.items():
                metrics[f"{self.prefix}/layer_{layer}/{name}"] = value
                per_layer.setdefault(name, []).append(value)
            load_before.append(rows[:, :num_experts].mean(0))
            load_after.append(rows[:, num_experts : 2 * num_experts].mean(0))
            totals += rows[:, 2 * num_experts :].sum(0)
        for name, values in per_layer.items():
            metrics[f"{self.prefix}/{name}"] = sum(values) / len(values)
        if totals[_ROUTED] > 0:  # model-wide fractions weigh layers by their assignments
            metrics[f"{self.prefix}/dropped_fraction"] = float(totals[_DROPPED] / totals[_ROUTED])
            metrics[f"{self.prefix}/rerouted_fraction"] = float(totals[_REROUTED] / totals[_ROUTED])
        loads = {}
        if load_before:
            loads = {"before": torch.stack(load_before), "after": torch.stack(load_after)}
        return metrics, loads

    def _layer_metrics(self, rows: torch.Tensor) -> dict[str, float]:
        """Per-step statistics of one layer, averaged over the steps in `rows` [S, 2E + 6]."""
        num_experts = self.num_experts
        sums: dict[str, float] = {}
        for row in rows:
            before, after = row[:num_experts], row[num_experts : 2 * num_experts]
            extra = row[2 * num_experts :]
            stats = load_stats(before, after, extra[_DROPPED], extra[_REROUTED],
                               float(extra[_CAPACITY] / extra[_RECORDS]), self.expert_to_rank)
            step = {name: getattr(stats, name) for name in _REPORTED}
            step.update(max_tokens_before=before.max(), max_tokens_after=after.max(),
                        capacity_floor=extra[_FLOOR] / extra[_RECORDS])
            for name, value in step.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        return {name: total / rows.shape[0] for name, total in sums.items()}
