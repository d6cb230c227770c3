"""Padding rows take no capacity (plan_routing's token_mask, issue 24).

A batch padded to a static size (Megatron pads a CUDA-graph decode batch with dummy tokens) plans
its real tokens exactly as the same tokens unpadded: C from the real count (kept on the device),
pads routed nowhere with weight 0, the shapes static and no host sync. Alone and over gloo
ranks (global scope, every rank padded to one static count).
"""

from dataclasses import replace

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from host_sync import HostSyncRecorder

from capaware_megatron import CapacityConfig, ExpertLayout, RoutingGroup, plan_routing
from capaware_megatron.synthetic import skewed_routing

NUM_EXPERTS, TOPK, ROWS = 8, 2, 48
LAYOUT = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 2, range(2))  # 4 EP ranks
CONFIGS = [CapacityConfig(gamma, policy=policy, priority=priority, scope=scope)
           for gamma in (0.75, 1.0) for policy in ("drop", "reroute", "expanded")
           for priority in ("score", "position", "random") for scope in ("local", "device")]


def _padded(real: int, seed: int = 0):
    """(scores, routing_map) of ROWS rows: `real` real tokens, then pads routed like tokens
    (Megatron's dummy tokens go through the router too)."""
    return skewed_routing(ROWS, NUM_EXPERTS, TOPK, skew=1.5, seed=seed)


def _assert_same_plan(padded, unpadded, real, what):
    assert torch.equal(padded.routing_map[:real], unpadded.routing_map), what
    torch.testing.assert_close(padded.probs[:real], unpadded.probs, msg=what)
    assert not padded.routing_map[real:].any() and not padded.probs[real:].any(), (what, "pads")
    assert torch.equal(padded.tokens_per_expert_after, unpadded.tokens_per_expert_after), what
    assert torch.equal(padded.tokens_per_expert_before, unpadded.tokens_per_expert_before), what
    assert int(padded.num_dropped) == int(unpadded.num_dropped), what
    assert int(padded.num_rerouted) == int(unpadded.num_rerouted), what
    assert int(padded.capacity) == int(unpadded.capacity), what


@pytest.mark.parametrize("real", [0, 1, 13, 30, ROWS])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_padded_plan_equals_the_unpadded_plan(cfg, real):
    scores, routing_map = _padded(real)
    probs = scores * routing_map
    mask = torch.arange(ROWS) < real
    with HostSyncRecorder() as syncs:
        padded = plan_routing(scores, routing_map, cfg, probs=probs, layout=LAYOUT, topk=TOPK,
                              validate=False, token_mask=mask)
    assert syncs.ops == []
    unpadded = plan_routing(scores[:real], routing_map[:real], cfg, probs=probs[:real], layout=LAYOUT)
    _assert_same_plan(padded, unpadded, real, (cfg, real))
    # The bound a static caller sizes by holds the plan's loads.
    assert padded.capacity_bound >= int(padded.capacity)
    loads = padded.tokens_per_expert_after
    if cfg.scope == "device":
        loads = loads.view(LAYOUT.num_ranks, -1).sum(1)
    assert int(loads.max()) <= int(padded.capacity)


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("scope", ["local", "device"])
def test_triton_backend_plans_padding_as_torch_does(policy, scope):
    pytest.importorskip("capaware_megatron.kernels")
    scores, routing_map = _padded(30)
    mask = torch.arange(ROWS) < 30
    plans = [plan_routing(scores, routing_map, CapacityConfig(0.75, policy=policy, scope=scope, backend=backend),
                          layout=LAYOUT, topk=TOPK, validate=False, token_mask=mask)
             for backend in ("torch", "triton")]
    assert torch.equal(plans[0].routing_map, plans[1].routing_map)
    torch.testing.assert_close(plans[0].probs, plans[1].probs)
    assert int(plans[0].num_dropped) + int(plans[0].num_rerouted) > 0


def test_the_cap_binds_among_the_padding():
    scores, routing_map = _padded(30)
    plan = plan_routing(scores, routing_map, CapacityConfig(0.75), token_mask=torch.arange(ROWS) < 30)
    assert int(plan.num_dropped) > 0 and int(plan.capacity) == 6  # ceil(30 * 2 / 8 * 0.75)


def test_the_guard_counts_the_rows_among_padding():
    """min_capacity's guard looks at the step's rows, padding included, so it is a host decision."""
    scores, routing_map = _padded(10)
    mask = torch.arange(ROWS) < 10
    cfg = CapacityConfig(0.5, min_capacity=8)  # rows: 48 * 2 / 8 = 12 >= 8; real: 2.5 < 8
    plan = plan_routing(scores, routing_map, cfg, token_mask=mask)
    assert isinstance(plan.capacity, torch.Tensor) and int(plan.capacity) == 8  # the floor
    guarded = plan_routing(scores, routing_map, replace(cfg, min_capacity=13), token_mask=mask)
    assert torch.equal(guarded.routing_map, routing_map & mask.unsqueeze(1))  # the identity


def test_a_bad_mask_is_refused():
    scores, routing_map = _padded(4)
    for mask in (torch.ones(ROWS - 1, dtype=torch.bool), torch.ones(ROWS, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"token_mask must be \[48\] bool"):
            plan_routing(scores, routing_map, CapacityConfig(1.0), token_mask=mask)


REAL = {2: [5, 17], 4: [17, 0, 9, 24]}  # real tokens per rank, each padded to ROWS


def _padded_global(rank, world_size, configs):
    per_rank = NUM_EXPERTS // world_size
    layout = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // per_rank,
                                range(rank * per_rank, (rank + 1) * per_rank))
    scores, routing_map = _padded(REAL[world_size][rank], seed=10 + rank)
    mask = torch.arange(ROWS) < REAL[world_size][rank]
    group = replace(RoutingGroup.from_process_group(), tokens_per_rank=ROWS)  # padded decode
    results = []
    for cfg in configs:
        with HostSyncRecorder() as syncs:
            plan = plan_routing(scores, routing_map, cfg, layout=layout, topk=TOPK, group=group,
                                validate=False, token_mask=mask)
        results.append((syncs.ops, plan))
    return results


@pytest.mark.parametrize("world_size", sorted(REAL))
def test_padded_global_plan_equals_the_gathered_real_tokens(world_size):
    configs = [CapacityConfig(1.0, policy=policy, priority=priority, scope="global")
               for policy in ("drop", "reroute", "expanded") for priority in ("score", "position", "random")]
    per_rank = run_gloo(_padded_global, world_size, configs)
    real = REAL[world_size]
    batches = [_padded(real[r], seed=10 + r) for r in range(world_size)]
    scores = torch.cat([s[: real[r]] for r, (s, _) in enumerate(batches)])
    routing_map = torch.cat([m[: real[r]] for r, (_, m) in enumerate(batches)])
    owner = torch.repeat_interleave(torch.arange(world_size), torch.tensor(real))
    local = (torch.arange(NUM_EXPERTS) // (NUM_EXPERTS // world_size)).unsqueeze(0) == owner.unsqueeze(1)
    for i, cfg in enumerate(configs):
        whole = plan_routing(scores, routing_map, cfg, local_experts=local)
        assert all(per_rank[r][i][0] == [] for r in range(world_size)), cfg
        plans = [per_rank[r][i][1] for r in range(world_size)]
        assert torch.equal(torch.cat([p.routing_map[: real[r]] for r, p in enumerate(plans)]), whole.routing_map), cfg
        torch.testing.assert_close(torch.cat([p.probs[: real[r]] for r, p in enumerate(plans)]), whole.probs)
        assert all(not p.routing_map[real[r]:].any() for r, p in enumerate(plans)), cfg
        assert int(plans[0].capacity) == whole.capacity and plans[0].capacity_bound >= whole.capacity
        assert not torch.equal(whole.routing_map, routing_map), "the cap must bind"
