"""Where load statistics go: console, JSON lines, W&B, TensorBoard, DeepSpeed's monitor.

Every sink has ``log(metrics, step, loads)``: scalar metrics keyed ``<prefix>/...`` (the
tracker's prefix: ``capaware``, ``capaware/eval``, ...), the step, and (when per-expert logging is
on) ``loads = {"before": [L, E], "after": [L, E]}``.
A sink that fails (W&B not installed, offline, bad key, network down) warns once and goes quiet:
monitoring never stops a job.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any, Mapping, Optional, TextIO

import torch

logger = logging.getLogger(__name__)

Loads = Optional[Mapping[str, torch.Tensor]]


class _FailSoft:
    """Mixin: the first exception disables the sink with one warning."""

    disabled = False

    def _fail(self, what: str, err: BaseException) -> None:
        if not self.disabled:
            warnings.warn(f"capaware monitor: {what} failed ({type(err).__name__}: {err}); "
                          "continuing without it", RuntimeWarning, stacklevel=3)
        self.disabled = True


class ConsoleSink:
    """One summary line per report."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream

    def log(self, metrics: Mapping[str, float], step: int, loads: Loads = None) -> None:
        prefix = metrics_prefix(metrics)

        def get(name: str) -> float:
            return metrics.get(f"{prefix}/{name}", float("nan"))

        print(
            f"[{prefix}] step {step}: straggler {get('straggler_expert_before'):.2f} -> "
            f"{get('straggler_expert_after'):.2f} per expert, {get('straggler_rank_before'):.2f} -> "
            f"{get('straggler_rank_after'):.2f} per rank; dropped {100 * get('dropped_fraction'):.1f}%, "
            f"rerouted {100 * get('rerouted_fraction'):.1f}%; projected layer speedup "
            f"{get('speedup_expert'):.2f}x",
            file=self.stream or sys.stdout,
        )


class JsonlSink:
    """Appends one JSON object per report: {"step", metrics..., optional loads}."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, metrics: Mapping[str, float], step: int, loads: Loads = None) -> None:
        record: dict[str, Any] = {"step": step, **metrics}
        if loads:
            record["loads"] = {k: v.tolist() for k, v in loads.items()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class WandbSink(_FailSoft):
    """W&B: one chart per metric across layers, layer averages, per-expert figures.

    Panel sections (W&B groups panels by the key's first segment):
    - ``capaware/<metric>``: the average over layers, one line chart per metric;
    - ``capaware_by_layer/<metric>``: one chart per metric with a line per layer (a W&B line
      series over the last `history` reports);
    - ``capaware_layers/layer_N/<metric>``: the raw per-layer scalars (for queries and filters);
    - with per-expert loads: ``capaware_experts/load_heatmap`` (layers x experts before | after,
      one colour scale, EP ranks marked) and ``capaware_experts/layer_N/tokens_per_expert_*``
      histograms. Figures need matplotlib (the ``figures`` extra); without it they are skipped.

    Args:
        run: a wandb run, or Megatron's W&B writer; None uses the active run or starts one with
            `init_kwargs` (project, mode="offline", dir, ...) at the first report.
        expert_to_rank: [E] EP rank of each expert, for the heatmap (default: the tracker's).
        title: names the run in figure titles (policy, gamma, scope).
        history: reports kept for the per-layer charts (each report re-logs them).
    """

    def __init__(self, run: Any = None, expert_to_rank: Any = None, title: str = "",
                 history: int = 100, **init_kwargs: Any) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.run = run
        self.expert_to_rank = expert_to_rank
        self.title = title
        self.history = history
        self.init_kwargs = init_kwargs
        self._per_layer: dict[str, list[tuple[int, dict[str, dict[int, float]]]]] = {}  # by prefix

    def bind(self, tracker: Any) -> None:
        """Called by the LoadTracker that owns this sink: learn its experts' EP ranks."""
        if self.expert_to_rank is None:
            self.expert_to_rank = tracker.expert_to_rank

    def _run(self):
        if self.run is None:
            import wandb

            self.run = wandb.run or wandb.init(**self.init_kwargs)
        return self.run

    def log(self, metrics: Mapping[str, float], step: int, loads: Loads = None) -> None:
        if self.disabled:
            return
        try:
            run = self._run()
            payload: dict[str, Any] = {}
            per_layer: dict[str, dict[int, float]] = {}
            prefix = metrics_prefix(metrics)
            for key, value in metrics.items():
                layer, metric = _split_layer_key(key, prefix)
                if layer is None:
                    payload[key] = value
                else:
                    payload[_section(prefix, "layers", f"layer_{layer}/{metric}")] = value
                    per_layer.setdefault(metric, {})[layer] = value
            if per_layer:
                history = [*self._per_layer.get(prefix, []), (step, per_layer)][-self.history :]
                self._per_layer[prefix] = history
                payload.update(self._layer_charts(prefix, history))
            if loads:
                payload.update(self._per_expert(loads, prefix))
            run.log(payload, step=step)
        except Exception as err:  # noqa: BLE001 - any W&B failure must not stop the job
            self._fail("W&B logging", err)

    @staticmethod
    def _layer_charts(prefix: str, history: list) -> dict[str, Any]:
        import wandb

        charts = {}
        steps = [step for step, _ in history]
        for metric, layers in history[-1][1].items():
            lines = sorted(layers)
            ys = [[report.get(metric, {}).get(layer, float("nan")) for _, report in history]
                  for layer in lines]
            charts[_section(prefix, "by_layer", metric)] = wandb.plot.line_series(
                xs=steps, ys=ys, keys=[f"layer {layer}" for layer in lines], title=metric, xname="step")
        return charts

    def _per_expert(self, loads: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
        import wandb

        out: dict[str, Any] = {}
        for layer, (before, after) in enumerate(zip(loads["before"], loads["after"])):
            for stage, load in (("before", before), ("after", after)):
                key = _section(prefix, "experts", f"layer_{layer}/tokens_per_expert_{stage}")
                out[key] = wandb.Histogram(np_histogram=_bars(load))
        try:
            from .. import figures

            figure = figures.load_heatmap(loads["before"], loads["after"], self.expert_to_rank, self.title)
        except ImportError:
            return out  # no matplotlib: histograms only
        out[_section(prefix, "experts", "load_heatmap")] = wandb.Image(
            figures.to_rgb(figure), caption="tokens per expert / mean, layers x experts: before | after the plan")
        return out

    def finish(self) -> None:
        if self.run is not None and hasattr(self.run, "finish"):
            try:
                self.run.finish()
            except Exception as err:  # noqa: BLE001
                self._fail("W&B finish", err)


def metrics_prefix(metrics: Mapping[str, float]) -> str:
    """The tracker prefix of a report ("capaware", "capaware/eval", ...): the part before the
    layer-averaged straggler key."""
    for key in metrics:
        if key.endswith("/straggler_expert_before") and "/layer_" not in key:
            return key[: -len("/straggler_expert_before")]
    return "capaware"


def _split_layer_key(key: str, prefix: str) -> tuple[Optional[int], str]:
    """"<prefix>/layer_3/capacity" -> (3, "capacity"); other keys -> (None, key)."""
    head = f"{prefix}/layer_"
    if key.startswith(head):
        number, _, metric = key[len(head):].partition("/")
        if number.isdigit() and metric:
            return int(number), metric
    return None, key


def _section(prefix: str, view: str, rest: str) -> str:
    """W&B key of a view: "capaware" -> "capaware_<view>/<rest>", "capaware/eval" ->
    "capaware_<view>/eval/<rest>" (W&B's panel section is the first segment)."""
    first, _, more = prefix.partition("/")
    return "/".join(part for part in (f"{first}_{view}", more, rest) if part)


def _bars(load: torch.Tensor):
    """A load vector as a histogram over expert indices (one bin per expert, height = load)."""
    edges = [float(i) for i in range(load.numel() + 1)]
    return [float(x) for x in load], edges


class TensorBoardSink(_FailSoft):
    """Scalars (and per-expert histograms) through a SummaryWriter or Megatron's writer."""

    def __init__(self, writer: Any = None, log_dir: Optional[str] = None) -> None:
        self.writer = writer
        self.log_dir = log_dir

    def log(self, metrics: Mapping[str, float], step: int, loads: Loads = None) -> None:
        if self.disabled:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=self.log_dir)
            prefix = metrics_prefix(metrics)
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            for stage, table in (loads or {}).items():
                for layer, load in enumerate(table):
                    self.writer.add_histogram(f"{prefix}/layer_{layer}/tokens_per_expert_{stage}", load, step)
        except Exception as err:  # noqa: BLE001
            self._fail("TensorBoard logging", err)


class DeepSpeedMonitorSink(_FailSoft):
    """DeepSpeed's own monitor (the "tensorboard" / "wandb" / "csv_monitor" config sections)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def log(self, metrics: Mapping[str, float], step: int, loads: Loads = None) -> None:
        if self.disabled or not getattr(self.monitor, "enabled", False):
            return
        try:
            self.monitor.write_events([(name, value, step) for name, value in metrics.items()])
        except Exception as err:  # noqa: BLE001
            self._fail("DeepSpeed monitor", err)


def megatron_sinks() -> list[Any]:
    """Megatron-LM's TensorBoard and W&B writers, when running under megatron.training."""
    try:
        from megatron.training import global_vars
    except Exception:  # noqa: BLE001 - not running under megatron.training
        return []
    sinks: list[Any] = []
    tensorboard = getattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", None)
    wandb_writer = getattr(global_vars, "_GLOBAL_WANDB_WRITER", None)
    if tensorboard is not None:
        sinks.append(TensorBoardSink(tensorboard))
    if wandb_writer is not None:
        sinks.append(WandbSink(wandb_writer))
    return sinks
