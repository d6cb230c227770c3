"""Global scope in eager steps with a token bound (CapacityConfig.max_tokens_per_rank, issue 26).

The counts stay on the device and C with them; the bound sizes each bin's group-wide threshold
on the host, so one [B, C_max] gather of top keys replaces the radix select's 8 gathers. Held
to the single-process plan of the gathered batch (and to the unbounded plan), with no host sync
and fewer collectives; a bound the tokens exceed is an error on every rank.
"""

import importlib.util
from dataclasses import replace

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from host_sync import HostSyncRecorder

from capaware_megatron import CapacityConfig, ExpertLayout, RoutingGroup, plan_routing
from capaware_megatron.config import GATHERED_TOP_KEYS_MAX
from capaware_megatron.synthetic import skewed_routing

NUM_EXPERTS, TOPK = 16, 2
SHARDS = {2: [100, 156], 4: [37, 0, 61, 12]}  # uneven, one rank empty at EP4
POLICIES = ["drop", "reroute", "expanded"]
PRIORITIES = ["score", "random"]


def _batch(world_size):
    scores, routing_map = skewed_routing(sum(SHARDS[world_size]), NUM_EXPERTS, TOPK, skew=2.0, seed=3)
    owner = torch.repeat_interleave(torch.arange(world_size), torch.tensor(SHARDS[world_size]))
    expert_to_rank = torch.arange(NUM_EXPERTS) // (NUM_EXPERTS // world_size)
    return scores, routing_map, expert_to_rank, expert_to_rank.unsqueeze(0) == owner.unsqueeze(1)


def _counting(group: RoutingGroup):
    """The group with its gathers counted: (group, the list each gather appends to)."""
    calls = []

    def gather(tensor):
        calls.append(tuple(tensor.shape))
        return group.all_gather(tensor)

    return replace(group, all_gather=gather), calls


def _bounded_plans(rank, world_size, configs):
    scores, routing_map, expert_to_rank, _ = _batch(world_size)
    bounds = torch.tensor([0, *SHARDS[world_size]]).cumsum(0)
    mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
    per_rank = NUM_EXPERTS // world_size
    layout = ExpertLayout.build(NUM_EXPERTS, expert_to_rank, range(rank * per_rank, (rank + 1) * per_rank))
    results = []
    for cfg in configs:
        group, gathers = _counting(RoutingGroup.from_process_group())
        with HostSyncRecorder() as syncs:
            plan = plan_routing(scores[mine], routing_map[mine], cfg, layout=layout, topk=TOPK,
                                group=group, validate=False)
        results.append(dict(syncs=syncs.ops, gathers=gathers, map=plan.routing_map, probs=plan.probs,
                            after=plan.tokens_per_expert_after, capacity=plan.capacity))
    return results


def _configs(bound, backend="torch"):
    return [CapacityConfig(1.0, policy=policy, priority=priority, scope="global", max_tokens_per_rank=bound,
                           backend=backend)
            for policy in POLICIES for priority in PRIORITIES]


@pytest.mark.parametrize("world_size", sorted(SHARDS))
def test_bounded_global_plan_is_the_gathered_plan_with_one_gather(world_size):
    tight = max(SHARDS[world_size])
    loose = GATHERED_TOP_KEYS_MAX * NUM_EXPERTS  # C_max above the limit: the radix select again
    configs = _configs(tight) + _configs(None) + _configs(loose)
    if importlib.util.find_spec("triton") is not None:  # the Triton select's unordered top keys
        configs += _configs(tight, "triton")
    per_rank = run_gloo(_bounded_plans, world_size, configs)
    scores, routing_map, _, local = _batch(world_size)
    count = len(POLICIES) * len(PRIORITIES)
    for i, cfg in enumerate(configs):
        results = [per_rank[r][i] for r in range(world_size)]
        assert all(r["syncs"] == [] for r in results), cfg
        whole = plan_routing(scores, routing_map, replace(cfg, max_tokens_per_rank=None, backend="torch"),
                             local_experts=local)
        assert torch.equal(torch.cat([r["map"] for r in results]), whole.routing_map), cfg
        torch.testing.assert_close(torch.cat([r["probs"] for r in results]), whole.probs)
        assert int(sum(r["after"] for r in results).max()) <= whole.capacity, cfg
        assert int(results[0]["capacity"]) == whole.capacity and isinstance(results[0]["capacity"], torch.Tensor)
        assert not torch.equal(whole.routing_map, routing_map), "the cap must bind"
    # Collectives: the [W, 2] counts, then one [B, C_max] top-keys gather per threshold (drop;
    # and per reroute round), against 8 [B, 256] digit-count gathers each without the bound.
    for i in range(count):
        bounded, unbounded, loose_run = (per_rank[0][i + j * count]["gathers"] for j in range(3))
        assert len(bounded) < len(unbounded) and loose_run == unbounded, configs[i]
        if configs[i].policy != "reroute":
            assert len(bounded) == 2 and len(unbounded) == 9, (bounded, unbounded)


def _over_the_bound(rank, world_size, validate):
    scores, routing_map, *_ = _batch(world_size)
    bounds = torch.tensor([0, *SHARDS[world_size]]).cumsum(0)
    mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
    cfg = CapacityConfig(1.0, scope="global", max_tokens_per_rank=120)  # rank 1 plans 156
    try:
        plan_routing(scores[mine], routing_map[mine], cfg, topk=TOPK, group=RoutingGroup.from_process_group(),
                     validate=validate)
    except (ValueError, RuntimeError) as err:
        return type(err).__name__, str(err)
    return None


@pytest.mark.parametrize("validate", [True, False])
def test_a_rank_over_the_bound_is_an_error_on_every_rank(validate):
    errors = run_gloo(_over_the_bound, 2, validate)
    if validate:
        assert all(e is not None and e[0] == "ValueError" and "rank 1: 156" in e[1]
                   and "max_tokens_per_rank=120" in e[1] for e in errors), errors
    else:  # a device assert (raised at once on CPU; on a GPU the device reports it)
        assert all(e is not None and "max_tokens_per_rank" in e[1] for e in errors), errors


def test_bound_checks_its_own_tokens_and_its_value():
    scores, routing_map = skewed_routing(64, NUM_EXPERTS, TOPK, skew=2.0)
    with pytest.raises(ValueError, match="max_tokens_per_rank=32 is smaller.*rank 0: 64"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, max_tokens_per_rank=32))
    for bad, error in [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="max_tokens_per_rank"):
            CapacityConfig(1.0, max_tokens_per_rank=bad)
