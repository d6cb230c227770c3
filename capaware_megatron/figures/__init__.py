"""Figures of expert load and of the quality / speed trade-off, drawn with matplotlib.

    from capaware_megatron import figures
    fig = figures.load_heatmap(before, after, expert_to_rank, title="drop, gamma 1.0, local")
    figures.save(fig, "out/expert_load.png")

matplotlib is imported lazily (the Agg backend, no display needed): importing this package needs
only torch, and a missing matplotlib names the extra to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .plots import DecodePoint, QualityPoint

__all__ = ["DecodePoint", "QualityPoint", "decode_pareto", "expert_load_bars", "load_heatmap",
           "quality_vs_speedup", "save", "to_rgb"]


def _plots():
    try:
        from . import plots
    except ImportError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        raise ImportError(
            "capaware_megatron.figures needs matplotlib: pip install 'capaware_megatron[figures]'"
        ) from err
    return plots


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(_plots(), name)
    raise AttributeError(name)
