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


@pytest.fixture(scope="module")
def megatron_ep1():
    """Megatron-Core's parallel state on one GPU (EP1: the all-to-all is the identity)."""
    pytest.importorskip("megatron.core")
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    import capaware_megatron.megatron as capaware

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    capaware.install()
    yield
    capaware.uninstall()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
def test_capaware_moe_layer_decode_step_replays_in_a_cuda_graph(megatron_ep1, policy):
    """A padded decode step of a capaware Megatron MoE layer (what Megatron's controller graphs
    after set_decode_expert_padding) captured with sync debug mode "error", replay == eager."""
    from megatron.core.inference import utils as inference_utils
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    import capaware_megatron.megatron as capaware

    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK, moe_ffn_hidden_size=128, moe_token_dispatcher_type="capaware",
        add_bias_linear=False, moe_router_load_balancing_type="none", params_dtype=torch.float32,
    )
    capaware.set_capacity_config(config, CapacityConfig(1.0, policy=policy))
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
    layer = spec.submodules.mlp(config=config).cuda().eval()
    inference_utils.moe_layer_cache = None
    inference_utils.set_decode_expert_padding(layer, True, capacity_factor=NUM_EXPERTS / TOPK)
    generator = torch.Generator(device="cuda").manual_seed(0)
    static_input = torch.randn(64, 1, 64, device="cuda", generator=generator)

    with torch.no_grad():
        graph, (captured, _) = _captured(lambda: layer(static_input))
        for _ in range(2):
            static_input.copy_(torch.randn(64, 1, 64, device="cuda", generator=generator))
            graph.replay()
            eager, _ = layer(static_input)
            torch.testing.assert_close(captured, eager)
    assert layer.token_dispatcher.capacity == min(-(-64 * TOPK // NUM_EXPERTS), 64)
    assert int(layer.token_dispatcher.last_plan.num_dropped) + int(
        layer.token_dispatcher.last_plan.num_rerouted) > 0, "the cap must bind"


@pytest.mark.parametrize("scope", ["local", "device"])
def test_padded_plan_replays_with_each_steps_real_token_count(scope):
    """A plan among padding (token_mask from a real-count tensor that the engine rewrites in
    place every step) captured once: each replay plans that step's real tokens, as the eager
    plan of those tokens alone does."""
    cfg = CapacityConfig(1.0, policy="reroute", scope=scope)
    layout = _layout()
    static_scores, static_map = _routing(0)
    real_count = torch.tensor([NUM_TOKENS], dtype=torch.int32, device="cuda")
    rows = torch.arange(NUM_TOKENS, device="cuda")

    def plan():
        return plan_routing(static_scores, static_map, cfg, layout=layout, topk=TOPK, validate=False,
                            token_mask=rows < real_count)

    graph, captured = _captured(plan)
    for real in (300, 77, NUM_TOKENS):
        real_count.fill_(real)
        graph.replay()
        torch.cuda.synchronize()
        eager = plan_routing(static_scores[:real], static_map[:real], cfg, layout=layout, topk=TOPK)
        assert torch.equal(captured.routing_map[:real], eager.routing_map), real
        assert not captured.routing_map[real:].any(), real
        assert torch.equal(captured.tokens_per_expert_after, eager.tokens_per_expert_after), real
        assert int(captured.capacity) == eager.capacity, real
