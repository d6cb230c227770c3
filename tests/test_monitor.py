"""Load monitor: statistics of a known routing, W&B offline records read back, the reduction
over 1/2/4 ranks with one collective per logging step, fail-soft sinks, framework wiring."""

import json
import os
import sys
import warnings

import pytest
import torch
import wandb_reader
from capaware_megatron.multiprocess import run_gloo

from capaware_megatron.monitor import ConsoleSink, JsonlSink, LoadTracker, WandbSink
from capaware_megatron.planner import RoutingPlan

E = 4
# Two layers, two steps of known loads (the whole job's batch).
BEFORE = torch.tensor([[[8, 4, 2, 2], [4, 4, 4, 4]], [[10, 2, 2, 2], [6, 6, 2, 2]]])
AFTER = torch.tensor([[[4, 4, 2, 2], [4, 4, 4, 4]], [[4, 2, 2, 2], [5, 5, 2, 2]]])
DROPPED = AFTER.sum(-1) - BEFORE.sum(-1)  # negative of what was lost
CAPACITY = 4


def _plan(before, after, rerouted=0):
    lost = int(before.sum() - after.sum()) + rerouted
    return RoutingPlan(
        routing_map=torch.zeros(0, E, dtype=torch.bool), probs=torch.zeros(0, E), capacity=CAPACITY,
        tokens_per_expert_before=before.long(), tokens_per_expert_after=after.long(),
        num_dropped=torch.tensor(lost - rerouted), num_rerouted=torch.tensor(rerouted),
    )


def _expected_layer(layer):
    """Hand-computed averages over the two steps (straggler = max / mean)."""
    b, a = BEFORE[:, layer].double(), AFTER[:, layer].double()
    straggler_b = (b.max(1).values / b.mean(1)).mean()
    straggler_a = (a.max(1).values / a.mean(1)).mean()
    dropped = ((b.sum(1) - a.sum(1)) / b.sum(1)).mean()
    speedup = (b.max(1).values / a.max(1).values).mean()
    return dict(straggler_expert_before=float(straggler_b), straggler_expert_after=float(straggler_a),
                dropped_fraction=float(dropped), speedup_expert=float(speedup))


def _feed(tracker, share=1.0, steps=2):
    for step in range(steps):
        for layer in range(2):
            tracker.record(layer, _plan(BEFORE[step % 2, layer] * share, AFTER[step % 2, layer] * share))
        tracker.step(step + 1)


def test_known_routing_statistics_and_wandb_record(tmp_path):
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    sink = WandbSink(project="capaware-test", mode="offline", dir=str(wandb_dir))
    jsonl = tmp_path / "stats.jsonl"
    tracker = LoadTracker(2, E, expert_to_rank=[0, 0, 1, 1], interval=2, per_expert=True,
                          sinks=[sink, JsonlSink(str(jsonl))])
    _feed(tracker)
    sink.finish()
    import wandb

    wandb.teardown()
    record = json.loads(jsonl.read_text().splitlines()[-1])
    for layer in range(2):
        for name, value in _expected_layer(layer).items():
            assert record[f"capaware/layer_{layer}/{name}"] == pytest.approx(value), (layer, name)
    assert record["capaware/straggler_expert_before"] == pytest.approx(
        (_expected_layer(0)["straggler_expert_before"] + _expected_layer(1)["straggler_expert_before"]) / 2)
    total_lost = float((BEFORE.sum(-1) - AFTER.sum(-1)).sum())
    assert record["capaware/dropped_fraction"] == pytest.approx(total_lost / float(BEFORE.sum()))
    # Per-device: experts {0,1} and {2,3}; step 1 of layer 0 is 12 vs 4 tokens.
    assert record["capaware/layer_0/straggler_rank_before"] == pytest.approx(((12 / 8) + (12 / 8)) / 2)
    assert record["loads"]["before"][0] == pytest.approx(BEFORE[:, 0].double().mean(0).tolist())

    history = wandb_reader.history(wandb_dir)
    logged = history[-1]
    assert logged["_step"] == 2
    files = wandb_reader.files(wandb_dir)
    for layer in range(2):
        for name, value in _expected_layer(layer).items():
            assert logged[f"capaware_layers/layer_{layer}/{name}"] == pytest.approx(value)
    # One chart per metric, a line per layer: a W&B line series backed by a table.
    for name, _ in _expected_layer(0).items():
        assert logged[f"capaware_by_layer/{name}_table._type"] == "table-file"
        table = json.loads((files / logged[f"capaware_by_layer/{name}_table.path"]).read_text())
        lines = {row[1]: row[2] for row in table["data"]}
        assert set(lines) == {"layer 0", "layer 1"}, table
        assert lines["layer 1"] == pytest.approx(_expected_layer(1)[name])
    assert "capaware/straggler_expert_before" in logged and "capaware/layer_0/capacity" not in logged
    assert logged["capaware_experts/load_heatmap._type"] == "image-file"
    assert (files / logged["capaware_experts/load_heatmap.path"]).stat().st_size > 10_000
    assert logged["capaware_experts/layer_1/tokens_per_expert_after._type"] == "histogram"
    assert logged["capaware_experts/layer_1/tokens_per_expert_after.values"] == pytest.approx(
        AFTER[:, 1].double().mean(0).tolist())


def _reduce_on_ranks(rank, world_size, steps):
    calls = []
    original = torch.distributed.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.distributed.all_reduce = counting
    tracker = LoadTracker(2, E, expert_to_rank=[0, 0, 1, 1], interval=2)
    # Each rank holds an equal share of every step's tokens.
    metrics = []
    for step in range(steps):
        for layer in range(2):
            share = 4 // world_size  # summed over the ranks: 4x the loads in every layout
            tracker.record(layer, _plan(BEFORE[step % 2, layer] * share, AFTER[step % 2, layer] * share))
        metrics.append(tracker.step(step + 1))
    return metrics, len(calls)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_reduction_is_layout_independent_with_one_collective_per_log(world_size):
    results = run_gloo(_reduce_on_ranks, world_size, 4)
    metrics, calls = results[0]
    assert calls == (2 if world_size > 1 else 0)  # steps 2 and 4 log; steps 1 and 3 do not
    assert metrics[0] is None and metrics[2] is None
    assert all(r[0][1] is None for r in results[1:])  # only the logging rank reports
    for layer in range(2):
        for name, value in _expected_layer(layer).items():
            assert metrics[1][f"capaware/layer_{layer}/{name}"] == pytest.approx(value)
            assert metrics[3][f"capaware/layer_{layer}/{name}"] == pytest.approx(value)


def test_wandb_failures_warn_once_and_the_job_goes_on(monkeypatch, capsys):
    import wandb

    def broken_init(**_kwargs):
        raise wandb.errors.CommError("network down")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setattr(wandb, "run", None)
    tracker = LoadTracker(2, E, interval=1, sinks=[WandbSink(project="x"), ConsoleSink()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _feed(tracker, steps=3)
    messages = [str(w.message) for w in caught if "capaware monitor" in str(w.message)]
    assert len(messages) == 1 and "network down" in messages[0]
    assert capsys.readouterr().out.count("[capaware] step") == 3


def test_wandb_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    tracker = LoadTracker(2, E, interval=1, sinks=[WandbSink(project="x")])
    with pytest.warns(RuntimeWarning, match="W&B logging failed"):
        _feed(tracker, steps=1)


def test_tracker_errors():
    with pytest.raises(ValueError, match="interval must be >= 0"):
        LoadTracker(1, E, interval=-1)
    with pytest.raises(ValueError, match="expert_to_rank must have 4 entries"):
        LoadTracker(1, E, expert_to_rank=[0, 1])
    tracker = LoadTracker(1, E)
    with pytest.raises(ValueError, match="layer must be in"):
        tracker.record(3, _plan(BEFORE[0, 0], AFTER[0, 0]))


def _megatron_monitored(rank, world_size, tmp):
    import megatron_harness as mh

    from capaware_megatron import CapacityConfig
    from capaware_megatron.megatron import attach_megatron

    layout = mh.Layout(ep=2, world_size=2)
    mh.setup(layout)
    tracker = LoadTracker(num_layers=1, num_experts=mh.EXPERTS, expert_to_rank=[e // 4 for e in range(8)],
                          interval=2, sinks=[JsonlSink(os.path.join(tmp, f"rank{rank}.jsonl"))])
    layer = mh.moe_layer(layout, "capaware", CapacityConfig(1.0)).eval()
    assert attach_megatron([layer], tracker) == 1
    totals = torch.zeros(3)
    for step in range(2):
        with torch.no_grad():
            layer(mh.local_input(20 + rank, seed=step * 10 + rank))
        plan = layer.token_dispatcher.last_plan
        totals += torch.tensor([float(plan.num_dropped), float(plan.tokens_per_expert_before.sum()), 1.0])
        tracker.step()
    return totals


def test_megatron_layers_feed_the_tracker(tmp_path):
    totals = sum(run_gloo(_megatron_monitored, 2, str(tmp_path)))
    assert not (tmp_path / "rank1.jsonl").exists()  # one rank logs
    record = json.loads((tmp_path / "rank0.jsonl").read_text())
    assert record["step"] == 2
    assert record["capaware/dropped_fraction"] == pytest.approx(float(totals[0] / totals[1]))
    assert record["capaware/layer_0/dropped_fraction"] > 0


def _deepspeed_monitored(rank, world_size, tmp):
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed import apply
    from capaware_megatron.deepspeed import attach_deepspeed

    dh.setup()
    layers = torch.nn.ModuleList([dh.moe_layer(2, 2), dh.moe_layer(2, 2)]).eval()
    apply(layers, {"capacity_aware": {"capacity_factor": 1.0, "policy": "reroute"}})
    tracker = LoadTracker(2, dh.EXPERTS, expert_to_rank=[e // 4 for e in range(8)], interval=1,
                          sinks=[JsonlSink(os.path.join(tmp, f"rank{rank}.jsonl"))])
    assert attach_deepspeed(layers, tracker) == 2
    with torch.no_grad():
        x = dh.local_tokens(rank, 24)
        for layer in layers:
            x = layer(x)[0]
    return tracker.step()


def test_deepspeed_gates_feed_the_tracker(tmp_path):
    metrics = run_gloo(_deepspeed_monitored, 2, str(tmp_path), env={"DS_ACCELERATOR": "cpu"})[0]
    assert metrics["capaware/rerouted_fraction"] > 0
    assert metrics["capaware/layer_1/max_tokens_after"] <= metrics["capaware/layer_1/capacity"] * 2


def _training_loop_hooks(rank, world_size):
    import argparse
    import io
    from contextlib import redirect_stdout

    import megatron_harness as mh

    from capaware_megatron import CapacityConfig
    from capaware_megatron.megatron import uninstall
    from capaware_megatron.megatron._compat import patch_typing_override
    from capaware_megatron.megatron.monitoring import configure_monitor, install_monitor_hooks

    layout = mh.Layout(world_size=world_size)
    mh.setup(layout)
    patch_typing_override()
    from megatron.training import global_vars, training

    layer = mh.moe_layer(layout, "capaware", CapacityConfig(1.0))  # capped in eval only
    x = mh.local_input(64, seed=rank, requires_grad=False)

    def evaluate_and_print_results(prefix, forward_step, data, model, iteration, *rest, **kw):
        layer.eval()
        layer(x)
        layer.train()

    # Stand-ins for Megatron-LM's loop pieces: the hooks wrap whatever the module holds.
    training.get_model = lambda *a, **kw: [layer]
    training.train_step = lambda *a, **kw: layer(x)
    training.evaluate_and_print_results = evaluate_and_print_results
    writer = _Writer()  # Megatron's writers live on the last rank
    global_vars._GLOBAL_TENSORBOARD_WRITER = writer if rank == world_size - 1 else None
    global_vars._GLOBAL_WANDB_WRITER = None
    install_monitor_hooks()
    parsed = [argparse.Namespace(capaware_log_interval=interval, capaware_log_per_expert=False, num_layers=1,
                                 num_experts=mh.EXPERTS, expert_model_parallel_size=1) for interval in (0, 1)]
    for args in parsed:  # Megatron parses more than once: the last parse counts
        configure_monitor(args)
    out = io.StringIO()
    with redirect_stdout(out), torch.no_grad():
        model = training.get_model()
        for iteration in (3, 4):  # resumed after iteration 3: Megatron logs 4 and 5
            training.train_step(iteration=iteration)
        training.evaluate_and_print_results("valid", None, None, model, 5, None, None)
        layer.eval()
        for _ in range(2):  # an inference script: forward passes, no train_step
            layer(x)
    uninstall()
    return out.getvalue(), {key: value for key, value in writer.scalars.items()}


def test_megatron_loop_hooks_report_each_phase_apart_from_the_writer_rank():
    (quiet, first), (printed, last) = run_gloo(_training_loop_hooks, 2)
    assert first == {} and quiet == "", "the last rank, which holds Megatron's writers, reports"
    steps = lambda prefix: sorted({step for (name, step) in last if name == f"{prefix}/dropped_fraction"})  # noqa: E731
    assert steps("capaware") == [4, 5]  # Megatron's own iterations after the resume
    assert steps("capaware/eval") == [5] and steps("capaware/inference") == [1, 2]
    assert last[("capaware/dropped_fraction", 5)] == 0  # dropless training, even after an evaluation
    assert last[("capaware/eval/dropped_fraction", 5)] > 0
    assert last[("capaware/inference/layer_0/dropped_fraction", 2)] > 0
    assert "[capaware/eval] step 5" in printed and "[capaware] step 4" in printed


class _Writer:
    """Records what a TensorBoard-style writer receives."""

    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, name, value, step):
        self.scalars[(name, step)] = value

    def add_histogram(self, name, values, step):
        self.histograms[(name, step)] = values


def test_tensorboard_and_megatron_writers(monkeypatch):
    from capaware_megatron.monitor import TensorBoardSink, megatron_sinks
    from capaware_megatron.megatron._compat import patch_typing_override

    writer = _Writer()
    tracker = LoadTracker(2, E, interval=2, per_expert=True, sinks=[TensorBoardSink(writer)])
    _feed(tracker)
    assert writer.scalars[("capaware/layer_0/dropped_fraction", 2)] == pytest.approx(
        _expected_layer(0)["dropped_fraction"])
    assert ("capaware/layer_1/tokens_per_expert_after", 2) in writer.histograms

    patch_typing_override()
    from megatron.training import global_vars

    monkeypatch.setattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", writer, raising=False)
    monkeypatch.setattr(global_vars, "_GLOBAL_WANDB_WRITER", None, raising=False)
    sinks = megatron_sinks()
    assert len(sinks) == 1 and isinstance(sinks[0], TensorBoardSink) and sinks[0].writer is writer


def test_counts_accumulate_in_one_persistent_buffer():
    """A CUDA graph replays the additions it captured into the memory it captured them in: the
    tracker keeps one buffer for the whole run (copied out and zeroed in place per step)."""
    tracker = LoadTracker(2, E, interval=0)
    buffer = tracker._current
    _feed(tracker, steps=3)
    assert tracker._current is buffer and not buffer.any()
    assert len(tracker._history) == 3 and all(step.data_ptr() != buffer.data_ptr() for step in tracker._history)
    assert tracker._history[0][0, :E].tolist() == BEFORE[0, 0].double().tolist()


def test_capacity_kept_on_the_device_is_recorded():
    """Global scope in eager steps hands the tracker a 0-dim tensor capacity: it counts alike."""
    tracker = LoadTracker(1, E, interval=1)
    plan = _plan(BEFORE[0, 0], AFTER[0, 0])
    plan.capacity = torch.tensor(CAPACITY)
    tracker.record(0, plan)
    assert tracker.step(1)["capaware/capacity"] == CAPACITY


def test_the_floor_is_reported_beside_the_capacity():
    """capacity_floor: the floor C was held to (the calibrated knee), averaged like capacity."""
    tracker = LoadTracker(2, E, interval=1)
    for layer, floor in ((0, 3), (1, 5)):
        plan = _plan(BEFORE[0, layer], AFTER[0, layer])
        plan.capacity_floor = floor
        tracker.record(layer, plan)
    metrics = tracker.step(1)
    assert metrics["capaware/layer_0/capacity_floor"] == 3 and metrics["capaware/layer_1/capacity_floor"] == 5
    assert metrics["capaware/capacity_floor"] == 4
