"""The calibrated floor (issue 24): the knee of an expert's GEMM time, its file, and the layers
that read it (min_capacity "auto" or a path) in Megatron-Core and DeepSpeed."""

import json
import os
import subprocess
import sys

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo

from capaware_megatron import CapacityConfig, plan_routing
from capaware_megatron.calibrate import (
    Calibration,
    ExpertShape,
    dtype_name,
    find_knee,
    knee_for,
    load,
    measure,
    resolve_min_capacity,
    row_counts,
    save,
)
from capaware_megatron.synthetic import skewed_routing

SHAPE = ExpertShape(hidden=16, ffn=24, dtype="float32", experts_per_rank=4)


def _calibration(shape=SHAPE, knee=6, device="cpu"):
    return Calibration(shape, device, (1, 2, 4, 8), (1.0, 1.0, 1.05, 2.0), 0.1, knee)


def test_knee_is_the_last_row_count_within_tolerance():
    rows = [1, 2, 4, 8, 12, 16, 24, 32]
    flat_then_linear = [1.0, 1.02, 0.97, 1.05, 1.09, 1.4, 2.1, 2.8]
    assert find_knee(rows, flat_then_linear, 0.1) == 12
    assert find_knee(rows, flat_then_linear, 0.5) == 16
    assert find_knee([1, 2], [1.0, 3.0], 0.1) == 1  # no flat region: the fewest rows
    with pytest.raises(ValueError):
        find_knee([1, 2], [1.0], 0.1)
    assert row_counts(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="cannot be calibrated; use one of float32"):
        dtype_name(torch.int8)


def test_measure_on_this_device():
    calibration = measure(ExpertShape(32, 64, "float32", 2, gated=True), "cpu", max_rows=32,
                          rounds=2, min_run_time=0.002)
    assert calibration.rows == tuple(row_counts(32)) and len(calibration.milliseconds) == len(calibration.rows)
    assert all(ms > 0 for ms in calibration.milliseconds)
    assert calibration.knee_rows in calibration.rows and calibration.device == "cpu"


def test_file_round_trip_and_lookup(tmp_path):
    path = tmp_path / "calibration.json"
    save(_calibration(knee=6), path)
    save(_calibration(ExpertShape(16, 24, "bfloat16", 4), knee=9), path)
    save(_calibration(knee=8), path)  # the same shape and device again: replaced
    assert len(load(path)) == 2
    assert knee_for(SHAPE, "cpu", path) == 8
    with pytest.raises(LookupError, match=r"no calibration for .* on 'NVIDIA H100'.*--hidden 16 --ffn 24"):
        knee_for(SHAPE, "NVIDIA H100", path)


def test_bad_files_name_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="min_capacity: no calibration file"):
        CapacityConfig(1.0, min_capacity=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="min_capacity: calibration file .* is not valid JSON"):
        CapacityConfig(1.0, min_capacity=str(broken))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="is not a calibration file"):
        CapacityConfig(1.0, min_capacity=str(other))
    no_knee = tmp_path / "no_knee.json"
    no_knee.write_text(json.dumps({"format": "capaware-calibration/1", "entries": [{"hidden": 1}]}))
    with pytest.raises(ValueError, match="entry 0 .* has no knee_rows"):
        CapacityConfig(1.0, min_capacity=str(no_knee))
    with pytest.raises(TypeError, match="min_capacity must be an int"):
        CapacityConfig(1.0, min_capacity=2.5)


def test_auto_reads_the_default_file_and_the_planner_needs_a_number(tmp_path, monkeypatch):
    path = save(_calibration(knee=5), tmp_path / "knees.json")
    monkeypatch.setenv("CAPAWARE_CALIBRATION", str(path))
    resolved = resolve_min_capacity(CapacityConfig(1.0, min_capacity="auto"), SHAPE, "cpu")
    assert resolved.min_capacity == 5
    assert resolve_min_capacity(CapacityConfig(1.0, min_capacity=str(path)), SHAPE, "cpu").min_capacity == 5
    scores, routing_map = skewed_routing(64, 8, 2, skew=2.0)
    with pytest.raises(ValueError, match="min_capacity='auto' names a calibration"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, min_capacity="auto"))
    # The floor acts as min_capacity does: C is never below it.
    plan = plan_routing(scores[:24], routing_map[:24], resolve_min_capacity(
        CapacityConfig(0.5, min_capacity=str(path)), SHAPE, "cpu"))
    assert plan.capacity == 5 and plan.capacity_floor == 5  # ceil(24 * 2 / 8 * 0.5) = 3 < 5


def test_command_line(tmp_path):
    out = tmp_path / "cal.json"
    run = subprocess.run([sys.executable, "-m", "capaware_megatron.calibrate", "--hidden", "16", "--ffn", "32",
                          "--dtype", "float32", "--experts-per-rank", "2", "--device", "cpu", "--max-rows", "16",
                          "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "knee:" in run.stdout and "<- knee" in run.stdout
    (entry,) = load(out)
    assert entry["hidden"] == 16 and entry["ffn"] == 32 and entry["experts_per_rank"] == 2 and entry["device"] == "cpu"


def _megatron_floor(rank, world_size, path):
    import megatron_harness as mh

    layout = mh.Layout(ep=2, world_size=2)
    mh.setup(layout)
    layer = mh.moe_layer(layout, "capaware", CapacityConfig(1.0, min_capacity=path)).eval()
    hidden = mh.local_input(4, seed=rank, requires_grad=False)
    with torch.no_grad():
        layer(hidden)
    resolved = layer.token_dispatcher.capacity_config.min_capacity, layer.token_dispatcher.last_plan.capacity
    # A configuration assigned later (as the benchmarks switch runs) is resolved alike.
    later = mh.moe_layer(layout, "capaware", CapacityConfig(1.0)).token_dispatcher
    later.capacity_config = CapacityConfig(2.0, min_capacity=path, decode_capacity_factor=1.0)
    return (*resolved, later.capacity_config.min_capacity, later._decode_config.capacity_factor)


def test_megatron_layer_resolves_the_floor_for_its_experts(tmp_path):
    pytest.importorskip("megatron.core")
    import megatron_harness as mh

    # EP2: each rank hosts 4 of the 8 experts (hidden 16, FFN 24, fp32), on this CPU.
    path = save(_calibration(ExpertShape(mh.HIDDEN, mh.FFN, "float32", mh.EXPERTS // 2), knee=3), tmp_path / "k.json")
    results = run_gloo(_megatron_floor, 2, str(path))
    # 4 tokens x top-2 over 8 experts: a mean of 1 < the floor 3: the guard leaves it uncapped.
    assert results == [(3, 4, 3, 1.0), (3, 4, 3, 1.0)]
    missing = tmp_path / "other.json"
    save(_calibration(ExpertShape(99, 99, "float32", 1), knee=3), missing)
    with pytest.raises(RuntimeError, match="no calibration for"):
        run_gloo(_megatron_floor, 2, str(missing))


def _deepspeed_floor(rank, world_size, path):
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed import apply

    dh.setup()
    layer = dh.moe_layer(ep_size=1, k=2)
    (gate,) = apply(layer, {"capacity_aware": {"capacity_factor": 1.0, "min_capacity": path}})
    return gate.capacity_config.min_capacity


def test_deepspeed_gate_resolves_the_floor_and_refuses_a_decode_factor(tmp_path):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed.config import parse_section

    path = save(_calibration(ExpertShape(dh.HIDDEN, dh.FFN, "float32", dh.EXPERTS), knee=7), tmp_path / "k.json")
    assert run_gloo(_deepspeed_floor, 1, str(path)) == [7]
    with pytest.raises(ValueError, match="decode_capacity_factor.*DeepSpeed-MoE has no decode regime"):
        parse_section({"capacity_aware": {"capacity_factor": 1.0, "decode_capacity_factor": 2.0}})
