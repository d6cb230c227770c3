"""The benchmarks' code paths on tiny shapes: their GPU rows must not first fail on a GPU."""

import math
import os
import sys

import pytest
import torch

from capaware_megatron import CapacityConfig, plan_routing
from capaware_megatron.synthetic import skewed_routing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "benchmarks"))
bench_planner = pytest.importorskip("bench_planner")


@pytest.mark.parametrize("provider", ["torch", "triton", "torch:reroute", "triton:reroute", "megatron"])
def test_every_provider_runs(provider):
    if provider.startswith("triton"):
        pytest.importorskip("capaware_megatron.kernels")
    if provider == "megatron":
        pytest.importorskip("megatron.core")
    scores, routing_map = skewed_routing(64, 8, 2, skew=1.0)
    backend, _, policy = provider.partition(":")
    run = (
        bench_planner._megatron_path(scores, routing_map, 2, 1.0)
        if provider == "megatron"
        else bench_planner._ours(scores, routing_map, 2, 1.0, backend, policy or "drop")
    )
    run()


@pytest.mark.parametrize("provider", ["torch", "torch:reroute", "megatron"])
def test_host_syncs_are_counted_per_plan(provider):
    """The plan step has none; the permutation after it, sized from the map, has one at least:
    the counter sees what it must."""
    if provider == "megatron":
        pytest.importorskip("megatron.core")
    scores, routing_map = skewed_routing(64, 8, 2, skew=1.0)
    backend, _, policy = provider.partition(":")

    def path(permute):
        if provider == "megatron":
            return bench_planner._megatron_path(scores, routing_map, 2, 1.0, permute=permute)
        return bench_planner._ours(scores, routing_map, 2, 1.0, backend, policy or "drop", permute=permute)

    cpu = torch.device("cpu")
    assert bench_planner.host_syncs(path(permute=False), cpu) == 0
    assert bench_planner.host_syncs(path(permute=True), cpu) >= 1


def test_traffic_model_terms():
    scores, routing_map = skewed_routing(512, 8, 2, skew=2.0)
    plan = plan_routing(scores, routing_map, CapacityConfig(1.0), topk=2)
    parts = bench_planner.triton_traffic(routing_map, 2, plan)
    kept = int(plan.tokens_per_expert_after.sum())
    assert parts["floor"] == 512 * 8 * 10 + kept * 12
    overfull = plan.tokens_per_expert_before >= plan.capacity
    assert parts["lists"] == 8 * 512 * 2 + 8 * int(plan.tokens_per_expert_before[overfull].sum())
    dropped = int(plan.num_dropped)
    assert 0 < parts["clears"] <= 64 * dropped  # at most two 32 B sectors per dropped entry
    # Nothing over capacity: no clears, no list re-reads.
    roomy = plan_routing(scores, routing_map, CapacityConfig(8.0), topk=2)
    assert bench_planner.triton_traffic(routing_map, 2, roomy)["clears"] == 0
    assert torch.equal(roomy.routing_map, routing_map)


def test_decode_benchmark_rows_are_cut_by_e_over_gamma_k():
    bench_decode = pytest.importorskip("bench_decode")
    for experts, topk, _ in bench_decode.SHAPES.values():
        stock = bench_decode.padded_rows(256, experts, topk, None)
        assert stock == experts * 256  # Megatron's E/k padding: T rows per expert per source rank
        for gamma in bench_decode.GAMMAS:
            assert stock / bench_decode.padded_rows(256, experts, topk, gamma) == pytest.approx(
                experts / (gamma * topk))
    assert bench_decode.padded_rows(4, 8, 2, 3.0) == 8 * 3  # ceil(4 * 2 / 8 * 3) = 3
    assert bench_decode.padded_rows(4, 8, 2, 8.0) == 8 * 4  # never more than T


def test_paired_perplexity_difference():
    bench_reroute = pytest.importorskip("bench_reroute")
    exact = [(20.0, 10), (30.0, 10), (12.0, 6)]
    assert bench_reroute.paired_difference(exact, exact) == (0.0, 0.0)
    worse = [(21.0, 10), (31.0, 10), (12.6, 6)]  # every batch 0.1 nats per token worse
    mean, error = bench_reroute.paired_difference(worse, exact)
    assert abs(mean - 0.1) < 1e-12 and error < 1e-12
    assert abs(bench_reroute.perplexity(exact) - math.exp(62 / 26)) < 1e-12


def test_decode_pareto_runs_end_to_end(tmp_path):
    """The decode Pareto on the smallest grid: calibration, quality, time, verdicts, figure."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("matplotlib")
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny_moe", "decode_pareto.py")
    figure = tmp_path / "pareto.png"
    run = subprocess.run([sys.executable, script, "--batches", "8", "--ep", "2", "--windows", "16",
                          "--tune-windows", "16", "--generate-bytes", "2", "--rounds", "2", "--max-rows", "4",
                          "--figure", str(figure)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("   8   2 ")]
    assert [row[2] for row in rows][:4] == ["Megatron", "dropless", "g1.0", "g1.0"] and len(rows) == 6
    dropless = next(row for row in rows if row[2] == "dropless")
    assert dropless[3] == "64" and dropless[-1] == "100.0%"  # E/k rows, every byte as dropless
    assert "B   8 EP2: decode factor" in run.stdout and "knee" in run.stdout
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
