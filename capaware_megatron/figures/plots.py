"""The figures themselves (imported through capaware_megatron.figures, which checks matplotlib).

Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot: no backend, no global
state, nothing shown; safe inside training jobs and worker processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure

_POLICY_STYLE = {  # marker and colour per policy, the same in every chart
    "none": ("*", "black"),
    "drop": ("o", "tab:blue"),
    "reroute": ("s", "tab:orange"),
    "expanded": ("^", "tab:green"),
}


@dataclass(frozen=True)
class QualityPoint:
    """One run of a quality / speed comparison (e.g. a row of the demo's table)."""

    name: str
    policy: str
    gamma: Optional[float]
    perplexity: float
    projected_speedup: float
    measured_speedup: float


def _relative_load(load: torch.Tensor) -> torch.Tensor:
    """[L, E] tokens -> tokens / that layer's mean tokens per expert (1.0 is balanced)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    mean = load.mean(dim=-1, keepdim=True)
    return torch.where(mean > 0, load / mean.clamp_min(1e-12), torch.zeros_like(load))


def _rank_boundaries(expert_to_rank: Optional[Sequence[int] | torch.Tensor]) -> list[float]:
    """x positions (between expert columns) where the hosting EP rank changes."""
    if expert_to_rank is None:
        return []
    ranks = torch.as_tensor(expert_to_rank).tolist()
    return [index - 0.5 for index in range(1, len(ranks)) if ranks[index] != ranks[index - 1]]


def _mark_ranks(axes, expert_to_rank, num_experts: int) -> None:
    """Rank boundaries as lines, each rank's name above its experts."""
    if expert_to_rank is None:
        return
    ranks = torch.as_tensor(expert_to_rank).tolist()
    edges = [-0.5, *_rank_boundaries(expert_to_rank), num_experts - 0.5]
    for x in edges[1:-1]:
        axes.axvline(x, color="white", linewidth=2.5)
        axes.axvline(x, color="black", linewidth=0.8, linestyle="--")
    top = axes.secondary_xaxis("top")
    top.set_xticks([(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])])
    top.set_xticklabels([f"EP rank {ranks[int(lo + 0.5)]}" for lo in edges[:-1]], fontsize=8)
    top.tick_params(length=0)


def load_heatmap(
    before: torch.Tensor,
    after: torch.Tensor,
    expert_to_rank: Optional[Sequence[int] | torch.Tensor] = None,
    title: str = "",
) -> Figure:
    """Layers x experts, load / mean load, before and after the plan on one colour scale.

    Args:
        before, after: [L, E] tokens per expert and layer (the router's choice; the plan's).
        expert_to_rank: [E] EP rank of each expert: rank boundaries are drawn.
        title: the run (policy, gamma, scope).
    """
    rel_before, rel_after = _relative_load(before), _relative_load(after)
    num_layers, num_experts = rel_before.shape
    vmax = max(float(rel_before.max()), float(rel_after.max()), 1.0)
    figure = Figure(figsize=(3.2 + 0.55 * num_experts, 1.6 + 0.4 * num_layers), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, values, name in ((panels[0], rel_before, "router (before)"), (panels[1], rel_after, "plan (after)")):
        image = axes.imshow(values.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("expert")
        axes.set_xticks(range(num_experts))
        axes.set_yticks(range(num_layers), [f"layer {i}" for i in range(num_layers)])
        for layer in range(num_layers):
            for expert in range(num_experts):
                value = float(values[layer, expert])
                axes.text(expert, layer, f"{value:.1f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 * vmax else "white")
        _mark_ranks(axes, expert_to_rank, num_experts)
    figure.colorbar(image, ax=panels, label="tokens / mean tokens per expert", shrink=0.9)
    figure.suptitle(title or "expert load", fontsize=11)
    return figure


def expert_load_bars(
    before: torch.Tensor,
    after: torch.Tensor,
    expert_to_rank: Optional[Sequence[int] | torch.Tensor] = None,
    capacity: Optional[float] = None,
    title: str = "",
    capacity_label: Optional[str] = None,
) -> Figure:
    """Tokens per expert of one layer, before and after the plan, with the mean and the cap.

    Args:
        before, after: [E] tokens per expert.
        capacity: the cap on what one expert receives (a line), in the units of `before`: with
            local scope and loads summed over W source ranks that is W * C.
        capacity_label: the line's legend entry (default "capacity <value>").
    """
    before = torch.as_tensor(before, dtype=torch.float64)
    after = torch.as_tensor(after, dtype=torch.float64)
    num_experts = before.numel()
    experts = torch.arange(num_experts, dtype=torch.float64)
    figure = Figure(figsize=(2.5 + 0.6 * num_experts, 3.4), layout="constrained")
    axes = figure.subplots()
    axes.bar((experts - 0.2).numpy(), before.numpy(), width=0.4, label="router (before)", color="tab:gray")
    axes.bar((experts + 0.2).numpy(), after.numpy(), width=0.4, label="plan (after)", color="tab:blue")
    axes.axhline(float(before.mean()), color="black", linewidth=0.8, linestyle=":", label="mean load")
    if capacity is not None:
        axes.axhline(float(capacity), color="tab:red", linewidth=1.2,
                     label=capacity_label or f"capacity {capacity:g}")
    axes.set_xticks(range(num_experts))
    axes.set_xlabel("expert")
    axes.set_ylabel("tokens")
    axes.legend(fontsize=8, loc="upper right")
    _mark_ranks(axes, expert_to_rank, num_experts)
    axes.set_xlim(-0.6, num_experts - 0.4)
    figure.suptitle(title or "tokens per expert", fontsize=11)
    return figure


def quality_vs_speedup(points: Sequence[QualityPoint], title: str = "") -> Figure:
    """Perplexity against projected and measured speedup: one marker per policy, gamma labelled."""
    if not points:
        raise ValueError("quality_vs_speedup needs at least one point")
    figure = Figure(figsize=(10, 4), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, field, label in ((panels[0], "projected_speedup", "projected speedup (max EP-rank load before / after)"),
                               (panels[1], "measured_speedup", "measured MoE-layer speedup (slowest rank)")):
        for policy, (marker, colour) in _POLICY_STYLE.items():
            mine = [p for p in points if p.policy == policy]
            if not mine:
                continue
            axes.scatter([getattr(p, field) for p in mine], [p.perplexity for p in mine], marker=marker,
                         color=colour, s=60 if policy != "none" else 140, label=policy, zorder=3)
            for p in mine:
                if p.gamma is not None:
                    axes.annotate(f"γ {p.gamma:g}", (getattr(p, field), p.perplexity), xytext=(5, 3),
                                  textcoords="offset points", fontsize=8, color=colour)
        axes.axvline(1.0, color="gray", linewidth=0.8, linestyle=":")
        axes.set_xlabel(label, fontsize=9)
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("perplexity (lower is better)")
    panels[0].legend(fontsize=8, title="policy", title_fontsize=8)
    figure.suptitle(title or "quality vs speed", fontsize=11)
    return figure


@dataclass(frozen=True)
class DecodePoint:
    """One decode setting at one batch size: its decode-step MoE time and its quality. kind
    groups settings across batch sizes (one marker each); label is drawn beside the point."""

    kind: str
    label: str
    batch: int
    ep: int
    milliseconds: float
    perplexity_increase: float  # over dropless, in percent


_MARKERS = ("*", "o", "s", "^", "D", "v", "P")


def _frontier(points: Sequence[DecodePoint]) -> list[DecodePoint]:
    """The points no other point beats in both time and quality, fastest first."""
    best, frontier = float("inf"), []
    for point in sorted(points, key=lambda p: (p.milliseconds, p.perplexity_increase)):
        if point.perplexity_increase < best:
            frontier.append(point)
            best = point.perplexity_increase
    return frontier


def decode_pareto(points: Sequence[DecodePoint], baseline_ms: dict[tuple[int, int], float],
                  title: str = "") -> Figure:
    """Decode-step MoE time against perplexity increase: a panel per EP size, a colour per batch
    size, a marker per kind of setting, each batch size's Pareto frontier as a line, and
    Megatron's E/k padding time as a dashed mark.

    baseline_ms: {(batch, ep): Megatron's E/k decode-step time}.
    """
    if not points:
        raise ValueError("decode_pareto needs at least one point")
    eps = sorted({p.ep for p in points})
    batches = sorted({p.batch for p in points})
    kinds = list(dict.fromkeys(p.kind for p in points))
    markers = dict(zip(kinds, _MARKERS))
    colours = dict(zip(batches, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    figure = Figure(figsize=(5.5 * len(eps), 4.6), layout="constrained")
    panels = figure.subplots(1, len(eps), squeeze=False)[0]
    for axes, ep in zip(panels, eps):
        for batch in batches:
            mine = [p for p in points if p.ep == ep and p.batch == batch]
            if not mine:
                continue
            colour = colours[batch]
            for p in mine:
                axes.scatter(p.milliseconds, p.perplexity_increase, marker=markers[p.kind], color=colour,
                             s=110 if markers[p.kind] == "*" else 45, zorder=3)
                if p.label != p.kind:
                    axes.annotate(p.label, (p.milliseconds, p.perplexity_increase), xytext=(4, 4),
                                  textcoords="offset points", fontsize=7, color=colour)
            frontier = _frontier(mine)
            axes.plot([p.milliseconds for p in frontier], [p.perplexity_increase for p in frontier], "-",
                      color=colour, linewidth=1.2, label=f"B {batch} per rank (frontier)")
            if (batch, ep) in baseline_ms:
                axes.axvline(baseline_ms[(batch, ep)], color=colour, linestyle="--", linewidth=0.8)
        for kind in kinds:
            axes.scatter([], [], marker=markers[kind], color="gray", label=kind)
        axes.axhline(2.0, color="gray", linestyle=":", linewidth=0.8)
        axes.set_xscale("log")
        axes.set_xlabel("decode-step MoE time, ms (slowest rank; dashed: Megatron's E/k padding)", fontsize=8)
        axes.set_ylabel("decode perplexity increase over dropless, %")
        axes.set_title(f"EP{ep}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title or "capacity-aware decode: time vs quality", fontsize=11)
    return figure


def to_rgb(figure: Figure):
    """[H, W, 3] uint8 numpy array of the rendered figure (for wandb.Image, TensorBoard, ...)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save(figure: Figure, path: str, dpi: int = 100) -> str:
    """Write `figure` as a PNG (or any format the suffix names); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
