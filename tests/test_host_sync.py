"""No host synchronization in the per-forward plan: every policy, priority and scope (global
over gloo ranks with uneven token counts), torch and Triton backends (host code; kernels under
the interpreter), and the plan steps of the Megatron dispatcher and the DeepSpeed gate. The
recorder fails on every op that would copy device data to the host on a GPU
(tests/host_sync.py); a planted one proves it watches."""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch
from host_sync import HostSyncRecorder

from capaware_megatron import CapacityConfig, ExpertLayout, plan_routing
from capaware_megatron.multiprocess import run_gloo
from capaware_megatron.synthetic import skewed_routing

NUM_TOKENS, NUM_EXPERTS, TOPK = 256, 16, 2
LAYOUT = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 4, range(4))
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def _plan(cfg, **kwargs):
    scores, routing_map = skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK, skew=2.0)
    probs = scores * routing_map
    with HostSyncRecorder() as syncs:
        plan = plan_routing(scores, routing_map, cfg, probs=probs, topk=TOPK, validate=False, **kwargs)
    return plan, syncs.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("priority", ["score", "position", "reverse", "random"])
@pytest.mark.parametrize("scope", ["local", "device"])
def test_plan_has_no_host_sync(backend, policy, priority, scope):
    cfg = CapacityConfig(1.0, policy=policy, priority=priority, scope=scope, backend=backend)
    plan, syncs = _plan(cfg, layout=LAYOUT)
    assert syncs == []
    assert int(plan.num_dropped) + int(plan.num_rerouted) > 0, "the cap must bind"


def test_the_recorder_sees_host_syncs():
    """Without a layout the expert mapping is checked on the host per call; validate=True reads
    the scores: both are what the recorder must report (each names where it happened)."""
    cfg = CapacityConfig(1.0, scope="device")
    _, syncs = _plan(cfg, expert_to_rank=torch.arange(NUM_EXPERTS) // 4)
    assert syncs and all("layout.py" in where for _, where in syncs)
    scores, routing_map = skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK)
    with HostSyncRecorder() as recorder:
        plan_routing(scores, routing_map, CapacityConfig(1.0), validate=True)
        scores[routing_map]  # boolean-mask indexing
        torch.nonzero(routing_map)
    ops = [op for op, _ in recorder.ops]
    assert "Tensor.__bool__" in ops and "aten.index with a boolean mask" in ops and "aten.nonzero" in ops


GLOBAL_SHARDS = [100, 156]  # uneven: the eager group's counts differ per rank


def _global_plan_syncs(rank, world_size, configs):
    from capaware_megatron import RoutingGroup

    scores, routing_map = skewed_routing(sum(GLOBAL_SHARDS), NUM_EXPERTS, TOPK, skew=2.0)
    mine = slice(sum(GLOBAL_SHARDS[:rank]), sum(GLOBAL_SHARDS[: rank + 1]))
    group = RoutingGroup.from_process_group()
    layout = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 4, range(4 * rank, 4 * rank + 4))
    results = []
    for cfg in configs:
        with HostSyncRecorder() as syncs:
            plan = plan_routing(scores[mine], routing_map[mine], cfg, layout=layout, topk=TOPK,
                                group=group, validate=False)
        results.append((syncs.ops, plan.routing_map))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_plan_has_no_host_sync(backend):
    """Scope global in eager steps (every rank its own token count): the counts, C and the
    thresholds stay on the device, for every policy and priority; still the single-process plan."""
    configs = [
        CapacityConfig(1.0, policy=policy, priority=priority, scope="global", backend=backend)
        for policy in ["drop", "reroute", "expanded"]
        for priority in ["score", "position", "reverse", "random"]
    ]
    per_rank = run_gloo(_global_plan_syncs, 2, configs)
    scores, routing_map = skewed_routing(sum(GLOBAL_SHARDS), NUM_EXPERTS, TOPK, skew=2.0)
    owner = torch.repeat_interleave(torch.arange(2), torch.tensor(GLOBAL_SHARDS))
    local = (torch.arange(NUM_EXPERTS) // 4).unsqueeze(0) == owner.unsqueeze(1)  # rank r: 4r..4r+3
    for i, cfg in enumerate(configs):
        assert [per_rank[r][i][0] for r in range(2)] == [[], []], cfg
        whole = plan_routing(scores, routing_map, replace(cfg, backend="torch"), local_experts=local)
        assert torch.equal(torch.cat([per_rank[r][i][1] for r in range(2)]), whole.routing_map), cfg
        assert not torch.equal(whole.routing_map, routing_map), "the cap must bind"


# DeepSeek-V3's router: sigmoid, an expert bias that only picks, group-limited top-k, scaling.
DEEPSEEK_ROUTER = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                       moe_router_num_groups=4, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5)


def _dispatcher_plan_syncs(rank, world_size, policy, scope, bound, router=None):
    import megatron_harness as mh

    mh.setup(mh.Layout(ep=2, world_size=2))
    layer = mh.moe_layer(mh.Layout(ep=2, world_size=2), "capaware",
                         CapacityConfig(1.0, policy=policy, scope=scope, max_tokens_per_rank=bound),
                         **(router or {})).eval()
    hidden = mh.local_input(64 - 16 * rank, seed=rank, requires_grad=False)  # eager: uneven
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
        dispatcher = layer.token_dispatcher
        with HostSyncRecorder() as syncs:
            plan = dispatcher.plan(routing_map, probs)
    return syncs.ops, int(plan.num_dropped) + int(plan.num_rerouted)


@pytest.mark.parametrize("policy,scope,bound", [
    ("drop", "local", None), ("reroute", "device", None), ("expanded", "local", None),
    ("drop", "global", None), ("reroute", "global", None),
    ("drop", "global", 64), ("reroute", "global", 64), ("expanded", "global", 64),  # a token bound
])
def test_megatron_dispatcher_plan_step_has_no_host_sync(policy, scope, bound):
    """Eager global scope too, with and without a token bound (max_tokens_per_rank)."""
    pytest.importorskip("megatron.core")
    results = run_gloo(_dispatcher_plan_syncs, 2, policy, scope, bound)
    assert [syncs for syncs, _ in results] == [[], []]
    assert sum(moved for _, moved in results) > 0


@pytest.mark.parametrize("policy", ["reroute", "expanded"])
def test_group_limited_router_plan_step_has_no_host_sync(policy):
    """The alternatives' weights (the router's per-token factor) and its group limit."""
    pytest.importorskip("megatron.core")
    results = run_gloo(_dispatcher_plan_syncs, 2, policy, "local", None, DEEPSEEK_ROUTER)
    assert [syncs for syncs, _ in results] == [[], []]
    assert sum(moved for _, moved in results) > 0


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
def test_deepspeed_gate_plan_step_has_no_host_sync(policy):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from capaware_megatron.deepspeed.gate import CapacityAwareGate

    gate = CapacityAwareGate(12, 8, 2, capacity_config=CapacityConfig(1.0, policy=policy), min_capacity=0).eval()
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(8, 12, generator=torch.Generator().manual_seed(1)) * 2)
        _, scores, routing_map = gate._router(torch.randn(64, 12, generator=torch.Generator().manual_seed(2)))
        gate._plan(scores, routing_map)  # the layout is built (and checked) at the first plan
        with HostSyncRecorder() as syncs:
            plan = gate._plan(scores, routing_map)
    assert syncs.ops == []
    assert int(plan.num_dropped) + int(plan.num_rerouted) > 0
