"""The plan inside a captured CUDA graph (GPU only; `make gpu-check`): replay equals eager,
nothing in the captured region copies device data to the host (sync debug mode "error"), and
the load tracker's counters keep accumulating on replay.

With an ExpertLayout every policy and priority, scopes local and device, has no host
synchronization (the CPU proof: tests/test_host_sync.py).
"""

import pytest
import torch

from capaware_megatron import CapacityConfig, ExpertLayout, plan_routing
from capaware_megatron.monitor import LoadTracker
from capaware_megatron.synthetic import skewed_routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

NUM_TOKENS, NUM_EXPERTS, TOPK = 512, 16, 2


def _routing(seed):
    return tuple(t.cuda() for t in skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK, skew=1.5, seed=seed))


def _layout():
    """4 EP ranks of 4 experts; this rank hosts experts 0-3 (on the GPU once, reused)."""
    layout = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 4, list(range(4)))
    return layout.to("cuda")


def _captured(fn):
    """(graph, fn's output captured in it): warm-up on a side stream, capture with sync debug
    mode "error" (any host copy raises)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: Triton compiles and autotunes outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph, out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("priority", ["score", "position", "random"])
@pytest.mark.parametrize("scope", ["local", "device"])
def test_plan_replays_in_a_cuda_graph_without_host_syncs(backend, policy, priority, scope):
    if backend == "triton":
        pytest.importorskip("capaware_megatron.kernels")
    cfg = CapacityConfig(1.0, policy=policy, priority=priority, scope=scope, backend=backend)
    layout = _layout()
    static_scores, static_map = _routing(0)

    def plan():
        return plan_routing(static_scores, static_map, cfg, layout=layout, topk=TOPK, validate=False)

    graph, captured = _captured(plan)
    for seed in (1, 2):
        scores, routing_map = _routing(seed)
        static_scores.copy_(scores)
        static_map.copy_(routing_map)
        graph.replay()
        torch.cuda.synchronize()
        eager = plan_routing(scores, routing_map, cfg, layout=layout, topk=TOPK)
        for field in ("routing_map", "probs", "tokens_per_expert_before", "tokens_per_expert_after",
                      "num_dropped", "num_rerouted"):
            assert torch.equal(getattr(captured, field), getattr(eager, field)), (seed, field)
        assert int(eager.num_dropped) + int(eager.num_rerouted) > 0, "the cap must bind"


def test_tracker_counts_every_replay():
    """Statistics under CUDA graphs: the captured additions land in the tracker's persistent
    buffer on each replay; a step (eager, between replays) reports them."""
    cfg = CapacityConfig(1.0)
    layout = _layout()
    static_scores, static_map = _routing(0)
    tracker = LoadTracker(1, NUM_EXPERTS, interval=0, device="cuda")

    def plan_and_record():
        plan = plan_routing(static_scores, static_map, cfg, layout=layout, topk=TOPK, validate=False)
        tracker.record(0, plan)
        return plan

    graph, captured = _captured(plan_and_record)
    tracker.step()  # what warm-up recorded
    tracker._history.clear()
    for _ in range(3):
        graph.replay()
    tracker.step()
    metrics = tracker.flush(1)
    eager = plan_routing(static_scores, static_map, cfg, layout=layout, topk=TOPK)
    routed = int(eager.tokens_per_expert_before.sum())
    assert metrics["capaware/dropped_fraction"] == pytest.approx(int(eager.num_dropped) / routed)
    assert metrics["capaware/capacity"] == pytest.approx(eager.capacity)  # 3 records, averaged
