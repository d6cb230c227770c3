"""The demo's W&B run and figures, read back from the offline run: the runs Table's columns and
rows, the three figures as images, the per-configuration scalars (rows made up, no model run)."""

import json
import os
import sys

import pytest

pytest.importorskip("wandb")
pytest.importorskip("matplotlib")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_moe"))
import demo  # noqa: E402
import wandb_reader  # noqa: E402

LAYERS, EXPERTS = 4, 8


def _row(name, policy, gamma, priority, perplexity, seconds, dropped):
    before = [[100.0 + 40 * (e == layer) for e in range(EXPERTS)] for layer in range(LAYERS)]
    after = [[min(v, 110.0) for v in row] for row in before]
    metrics = {f"capaware/{m}": 1.0 for m in ("straggler_expert_before", "straggler_expert_after",
                                               "straggler_rank_before", "straggler_rank_after",
                                               "speedup_rank", "rerouted_fraction")}
    metrics["capaware/dropped_fraction"] = dropped
    metrics.update({f"capaware/layer_{layer}/capacity": 55.0 for layer in range(LAYERS)})
    return dict(name=name, policy=policy, gamma=gamma, priority=priority, perplexity=perplexity,
                moe_seconds=seconds, metrics=metrics, loads={"before": before, "after": after})


def test_demo_writes_the_runs_table_and_figures_to_wandb(tmp_path):
    rows = [_row("dropless", "none", None, "score", 5.0, 1.0, 0.0),
            _row("drop g1.0", "drop", 1.0, "score", 5.2, 0.8, 0.16),
            _row("drop-random g1.0", "drop", 1.0, "random", 7.4, 0.8, 0.17)]
    figures_by_key = demo._figures(rows)
    run_dir = demo._write_wandb(rows, figures_by_key, str(tmp_path))
    assert run_dir, "the W&B run was not written"
    history = wandb_reader.history(tmp_path)
    assert [item["demo/perplexity"] for item in history if "demo/perplexity" in item] == [5.0, 5.2, 7.4]
    last = history[-1]
    files = wandb_reader.files(tmp_path)
    table = json.loads((files / last["demo/runs.path"]).read_text())
    assert table["columns"] == demo.TABLE_COLUMNS
    assert [row[0] for row in table["data"]] == ["dropless", "drop g1.0", "drop-random g1.0"]
    assert table["data"][1][demo.TABLE_COLUMNS.index("measured_speedup")] == pytest.approx(1.25)
    for key in ("demo/expert_load", "demo/expert_load_layer0", "demo/quality_vs_speedup"):
        assert last[f"{key}._type"] == "image-file"
        assert (files / last[f"{key}.path"]).stat().st_size > 10_000
