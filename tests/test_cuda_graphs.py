"""The plan inside a captured CUDA graph (GPU only; `make gpu-check`): replay equals eager and
nothing in the captured region copies device data to the host.

Scope local with policy drop or expanded is the path with no host synchronization today;
reroute, scope device and scope global still sync per plan (see the planner's notes).
"""

import pytest
import torch

from capaware_megatron import CapacityConfig, plan_routing
from capaware_megatron.synthetic import skewed_routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

NUM_TOKENS, NUM_EXPERTS, TOPK = 512, 16, 2


def _routing(seed):
    return tuple(t.cuda() for t in skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK, skew=1.5, seed=seed))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("policy", ["drop", "expanded"])
@pytest.mark.parametrize("priority", ["score", "position", "random"])
def test_plan_replays_in_a_cuda_graph_without_host_syncs(backend, policy, priority):
    if backend == "triton":
        pytest.importorskip("capaware_megatron.kernels")
    cfg = CapacityConfig(1.0, policy=policy, priority=priority, backend=backend)
    local = torch.zeros(NUM_EXPERTS, dtype=torch.bool, device="cuda")
    local[:4] = True  # the experts of this rank, a device mask: no host-to-device copy per plan
    static_scores, static_map = _routing(0)

    def plan():
        return plan_routing(static_scores, static_map, cfg, local_experts=local, topk=TOPK, validate=False)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: Triton compiles and autotunes outside the capture
            plan()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            captured = plan()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in (1, 2):
        scores, routing_map = _routing(seed)
        static_scores.copy_(scores)
        static_map.copy_(routing_map)
        graph.replay()
        torch.cuda.synchronize()
        eager = plan_routing(scores, routing_map, cfg, local_experts=local, topk=TOPK)
        for field in ("routing_map", "probs", "tokens_per_expert_before", "tokens_per_expert_after",
                      "num_dropped", "num_rerouted"):
            assert torch.equal(getattr(captured, field), getattr(eager, field)), (seed, field)
        assert int(eager.num_dropped) > 0, "the cap must bind"
