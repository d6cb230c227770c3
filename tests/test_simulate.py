"""plan_as_ranks (expert parallelism simulated in one process) against the plans of real gloo
ranks: the same kept, rerouted and dropped assignments at EP2 and EP4, for every policy and
scope, so quality measured with the simulation is the quality those ranks would give."""

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from megatron_harness import Layout

from capaware_megatron import CapacityConfig
from capaware_megatron.simulate import plan_as_ranks

pytest.importorskip("megatron.core")

CONFIGS = [CapacityConfig(gamma, policy=policy, scope=scope, priority=priority)
           for policy in ("drop", "reroute", "expanded") for scope in ("local", "device", "global")
           for gamma, priority in ((1.0, "score"), (0.75, "random"))]


def _rank_plans(rank, world_size):
    import megatron_harness as mh

    layout = Layout(ep=world_size, world_size=world_size)
    mh.setup(layout)
    x = mh.local_input(10 + 3 * rank, seed=400 + rank, requires_grad=False)  # uneven T per rank
    plans = []
    for cfg in CONFIGS:
        layer = mh.moe_layer(layout, "capaware", cfg).eval()
        records = mh.record_plans(layer)
        with torch.no_grad():
            layer(x)
        scores, routing_map, probs, plan = records[-1]
        plans.append((scores, routing_map, probs, plan.routing_map, plan.probs))
    return plans


@pytest.mark.parametrize("ep", [2, 4])
def test_simulated_ranks_plan_like_real_ones(ep):
    per_rank = run_gloo(_rank_plans, ep)
    for index, cfg in enumerate(CONFIGS):
        parts = [per_rank[rank][index] for rank in range(ep)]
        scores, routing_map, probs, kept, weights = (torch.cat([p[i] for p in parts]) for i in range(5))
        ranks = torch.cat([torch.full((p[0].shape[0],), rank) for rank, p in enumerate(parts)])
        # Interleave the ranks' tokens (each rank's in its own order, their index on that rank).
        labels = ranks[torch.randperm(len(ranks), generator=torch.Generator().manual_seed(index))]
        order = torch.empty_like(ranks)
        for rank in range(ep):
            order[labels == rank] = (ranks == rank).nonzero().squeeze(1)
        simulated = plan_as_ranks(scores[order], routing_map[order], cfg, ranks[order], ep,
                                  probs=probs[order], topk=2)
        assert torch.equal(simulated.routing_map, kept[order]), cfg
        torch.testing.assert_close(simulated.probs, weights[order], msg=str(cfg))
        assert int(simulated.num_dropped) + int(simulated.num_rerouted) > 0 or cfg.policy == "expanded"


def test_steps_are_planned_apart():
    from capaware_megatron import plan_routing
    from capaware_megatron.synthetic import skewed_routing

    scores, routing_map = skewed_routing(64, 8, 2, skew=1.5, seed=3)
    cfg = CapacityConfig(1.0)
    steps = torch.arange(64) % 4  # four decode steps, interleaved
    merged = plan_as_ranks(scores, routing_map, cfg, torch.zeros(64, dtype=torch.long), 1, step_of_token=steps)
    for step in range(4):
        alone = plan_routing(scores[steps == step], routing_map[steps == step], cfg)
        assert torch.equal(merged.routing_map[steps == step], alone.routing_map)
    with pytest.raises(ValueError, match="num_ranks must divide"):
        plan_as_ranks(scores, routing_map, cfg, torch.zeros(64, dtype=torch.long), 3)
