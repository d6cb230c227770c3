"""Global scope over gloo ranks equals the single-process plan of the gathered batch."""

from dataclasses import replace

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from reference import reference_plan
from capaware_megatron.synthetic import skewed_routing

from capaware_megatron import CapacityConfig, RoutingGroup, plan_routing
from capaware_megatron.ops import kth_largest
from capaware_megatron.priority import NOT_ROUTED

NUM_EXPERTS, TOPK = 8, 2


def _shards(world_size: int) -> list[int]:
    """Uneven token counts per rank (sequence lengths differ across ranks), one rank empty."""
    return [37, 0, 61, 12][:world_size] if world_size > 2 else [37, 61]


def _batch(world_size):
    scores, routing_map = skewed_routing(sum(_shards(world_size)), NUM_EXPERTS, TOPK, skew=2.0, seed=5)
    per_rank = NUM_EXPERTS // world_size
    owner = torch.repeat_interleave(torch.arange(world_size), torch.tensor(_shards(world_size)))
    # Each token's own device hosts experts [owner * m, (owner + 1) * m).
    local = (torch.arange(NUM_EXPERTS) // per_rank).unsqueeze(0) == owner.unsqueeze(1)
    expert_to_rank = (torch.arange(NUM_EXPERTS) // per_rank).tolist()
    return scores, routing_map, local, expert_to_rank


def _plan_on_rank(rank, world_size, configs):
    scores, routing_map, local, expert_to_rank = _batch(world_size)
    bounds = torch.tensor([0] + _shards(world_size)).cumsum(0)
    mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
    group = RoutingGroup.from_process_group()
    results = []
    for cfg in configs:
        plan = plan_routing(
            scores[mine], routing_map[mine], cfg,
            local_experts=local[mine], expert_to_rank=expert_to_rank, group=group,
        )
        results.append(
            (plan.routing_map, plan.probs, int(plan.capacity), int(plan.num_dropped), int(plan.num_rerouted))
        )
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_scope_equals_single_process(world_size):
    configs = [
        CapacityConfig(1.0, policy=policy, scope=scope, priority=priority)
        for policy in ["drop", "reroute", "expanded"]
        for scope in ["global"]
        for priority in ["score", "random"]
    ] + [
        CapacityConfig(0.75, policy="reroute", scope="global", priority="position"),
        # The decode guard, decided on the device: these plans are the identity.
        CapacityConfig(1.0, policy="expanded", scope="global", min_capacity=60),
        CapacityConfig(1.0, policy="reroute", scope="global", min_capacity=60, renormalize=True),
    ]
    scores, routing_map, local, expert_to_rank = _batch(world_size)
    per_rank = run_gloo(_plan_on_rank, world_size, configs)
    for i, cfg in enumerate(configs):
        results = [r[i] for r in per_rank]
        got_map = torch.cat([r[0] for r in results])
        got_probs = torch.cat([r[1] for r in results])
        whole = plan_routing(scores, routing_map, cfg, local_experts=local)
        ref_map, ref_probs, ref_cap = reference_plan(scores, routing_map, cfg, local)
        assert torch.equal(got_map, whole.routing_map), cfg
        assert torch.equal(got_map, ref_map), cfg
        torch.testing.assert_close(got_probs, ref_probs)
        assert {r[2] for r in results} == {ref_cap}
        assert sum(r[3] for r in results) == int(whole.num_dropped)
        assert sum(r[4] for r in results) == int(whole.num_rerouted)
        # The cap holds for what each expert receives from all ranks together.
        assert int(got_map.sum(0).max()) <= ref_cap


def test_global_scope_triton_backend_equals_torch():
    pytest.importorskip("capaware_megatron.kernels")
    # Position priority: rank 0's tokens come first, so it alone holds some bins' group-wide top-C.
    configs = [
        CapacityConfig(1.0, policy=policy, scope="global", priority=priority, backend="triton")
        for policy in ["drop", "reroute", "expanded"]
        for priority in ["score", "position"]
    ]
    scores, routing_map, local, _ = _batch(2)
    per_rank = run_gloo(_plan_on_rank, 2, configs)
    for i, cfg in enumerate(configs):
        got_map = torch.cat([r[i][0] for r in per_rank])
        got_probs = torch.cat([r[i][1] for r in per_rank])
        whole = plan_routing(scores, routing_map, replace(cfg, backend="torch"), local_experts=local)
        assert torch.equal(got_map, whole.routing_map), cfg
        assert torch.equal(got_probs, whole.probs), cfg
        assert sum(r[i][3] for r in per_rank) == int(whole.num_dropped)


def _rank_keys(rank, num_bins=5):
    """This rank's [B, L] unique keys (L differs per rank, rank 1 has none), NOT_ROUTED holes."""
    gen = torch.Generator().manual_seed(rank)
    length = [23, 0, 41][rank]
    keys = torch.randint(-2**40, 2**40, (num_bins, length), generator=gen) * 4 + rank
    return keys.masked_fill(torch.rand(num_bins, length, generator=gen) < 0.2, NOT_ROUTED)


def _kth_on_rank(rank, world_size, kth):
    keys = _rank_keys(rank)
    bins = torch.arange(keys.shape[0]).unsqueeze(1).expand_as(keys)
    return kth_largest(keys.reshape(-1), bins.reshape(-1), keys.shape[0], kth, RoutingGroup.from_process_group())


def test_kth_largest_selects_over_the_ranks():
    """Each bin's kth-largest key of all ranks' keys together, on every rank alike."""
    kth = torch.tensor([1, 7, 30, 51, 80])  # the last two exceed some bins' group-wide count
    results = run_gloo(_kth_on_rank, 3, kth)
    merged = torch.cat([_rank_keys(rank) for rank in range(3)], dim=1)
    for b, k in enumerate(kth.tolist()):
        real = sorted((v for v in merged[b].tolist() if v != NOT_ROUTED), reverse=True)
        want = real[k - 1] if k <= len(real) else NOT_ROUTED
        assert [int(r[b]) for r in results] == [want] * 3, (b, k)
    assert any(int(results[0][b]) == NOT_ROUTED for b in range(5))
