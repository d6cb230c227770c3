"""The figures: what a reader needs is on them (axes, labels, one colour scale, rank boundaries)."""

import pytest
import torch

pytest.importorskip("matplotlib")

from capaware_megatron import figures  # noqa: E402

BEFORE = torch.tensor([[10.0, 2.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 13.0]])
AFTER = torch.tensor([[5.0, 2.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0], [1.0, 1.0, 1.0, 5.0]])
RANKS = [0, 0, 1, 1]


def _image_axes(figure):
    return [axes for axes in figure.axes if axes.images]


def test_heatmap_before_after_on_one_scale_with_ranks():
    figure = figures.load_heatmap(BEFORE, AFTER, RANKS, title="drop, γ 1.0, local")
    panels = _image_axes(figure)
    assert [axes.get_title() for axes in panels] == ["router (before)", "plan (after)"]
    limits = {axes.images[0].get_clim() for axes in panels}
    assert len(limits) == 1 and limits.pop() == (0.0, 13 / 4)  # layer 2: 13 tokens, mean 4
    before = panels[0].images[0].get_array()
    assert before[0].tolist() == pytest.approx([10 / 4, 2 / 4, 4 / 4, 0.0])  # load / mean, per layer
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["layer 0", "layer 1", "layer 2"]
    assert panels[0].get_xlabel() == "expert"
    boundaries = {round(line.get_xdata()[0], 2) for axes in panels for line in axes.lines}
    assert boundaries == {1.5}  # experts 0-1 on rank 0, 2-3 on rank 1
    colourbars = [axes for axes in figure.axes if axes.get_ylabel() == "tokens / mean tokens per expert"]
    assert len(colourbars) == 1
    assert figure.get_suptitle() == "drop, γ 1.0, local"


def test_load_bars_show_before_after_mean_and_capacity():
    figure = figures.expert_load_bars(BEFORE[0], AFTER[0], RANKS, capacity=6, capacity_label="C = 6")
    (axes,) = [a for a in figure.axes if a.patches]
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == BEFORE[0].tolist() + AFTER[0].tolist()
    labels = axes.get_legend_handles_labels()[1]
    assert labels == ["mean load", "C = 6", "router (before)", "plan (after)"]
    assert {round(float(line.get_ydata()[0]), 2) for line in axes.lines if line.get_label() == "C = 6"} == {6.0}


def test_quality_vs_speedup_marks_policies_and_gammas():
    points = [figures.QualityPoint("dropless", "none", None, 5.0, 1.0, 1.0),
              figures.QualityPoint("drop g1.0", "drop", 1.0, 5.2, 1.3, 1.2),
              figures.QualityPoint("reroute g1.0", "reroute", 1.0, 5.1, 1.2, 0.9)]
    figure = figures.quality_vs_speedup(points)
    left, right = figure.axes[:2]
    assert left.get_legend_handles_labels()[1] == ["none", "drop", "reroute"]
    assert [t.get_text() for t in left.texts] == ["γ 1", "γ 1"]
    drop = next(c for c in left.collections if c.get_label() == "drop")
    assert drop.get_offsets().tolist() == [[1.3, 5.2]]
    assert next(c for c in right.collections if c.get_label() == "drop").get_offsets().tolist() == [[1.2, 5.2]]
    with pytest.raises(ValueError, match="at least one point"):
        figures.quality_vs_speedup([])


def test_save_and_render(tmp_path):
    figure = figures.load_heatmap(BEFORE, AFTER)
    path = figures.save(figure, str(tmp_path / "sub" / "heatmap.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = figures.to_rgb(figure)
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype.name == "uint8"
    assert pixels.std() > 10  # not a blank canvas


def test_decode_pareto_draws_each_batch_sizes_frontier():
    point = figures.DecodePoint
    points = [point("dropless", "dropless", 8, 2, 10.0, 0.0), point("g1.0 local", "g1.0 local", 8, 2, 5.0, 30.0),
              point("g1.0 global", "g1.0 global", 8, 2, 12.0, 15.0),  # slower and worse: off the frontier
              point("decode factor + floor", "g1.5 floor", 8, 2, 7.0, 1.0),
              point("dropless", "dropless", 32, 2, 20.0, 0.0), point("g1.0 local", "g1.0 local", 32, 2, 9.0, 9.0)]
    figure = figures.decode_pareto(points, {(8, 2): 10.5, (32, 2): 20.5})
    (axes,) = figure.axes
    frontiers = {line.get_label(): line for line in axes.lines if "frontier" in line.get_label()}
    small = frontiers["B 8 per rank (frontier)"]
    assert small.get_xdata().tolist() == [5.0, 7.0, 10.0] and small.get_ydata().tolist() == [30.0, 1.0, 0.0]
    assert frontiers["B 32 per rank (frontier)"].get_xdata().tolist() == [9.0, 20.0]
    assert [t.get_text() for t in axes.texts] == ["g1.5 floor"]  # the decode factor's label
    assert sorted(round(line.get_xdata()[0], 1) for line in axes.lines if line.get_linestyle() == "--") == [10.5, 20.5]
    assert axes.get_title() == "EP2" and axes.get_xscale() == "log"
    with pytest.raises(ValueError, match="at least one point"):
        figures.decode_pareto([], {})
