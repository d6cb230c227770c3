"""plan_routing's eligible mask: a router's own limit on where a token's experts may be
(DeepSeek-V3's group-limited routing) holds for what reroute moves and expanded adds.

Against the loop reference planner (tests/reference.py) with the same mask, both backends,
local and device scope; and a property: nothing placed outside a token's picks is ineligible.
"""

import pytest
import torch
from host_sync import HostSyncRecorder
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_plan

from capaware_megatron import CapacityConfig, ExpertLayout, plan_routing
from capaware_megatron.synthetic import skewed_routing

NUM_EXPERTS, TOPK, GROUPS = 8, 2, 4
LAYOUT = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 2, range(2))  # 4 EP ranks


def _groups_of_picks(routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E]: the experts in the groups (of NUM_EXPERTS // GROUPS) holding one of the picks."""
    in_group = routing_map.view(routing_map.shape[0], GROUPS, -1).any(-1)
    return in_group.repeat_interleave(NUM_EXPERTS // GROUPS, dim=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scope", ["local", "device"])
@pytest.mark.parametrize("policy", ["reroute", "expanded"])
@pytest.mark.parametrize("mask", ["groups", "random"])
def test_eligible_plan_equals_the_reference(policy, scope, backend, mask):
    scores, routing_map = skewed_routing(40, NUM_EXPERTS, TOPK, skew=2.0, seed=3)
    if mask == "groups":
        eligible = _groups_of_picks(routing_map)
    else:
        eligible = torch.rand(scores.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    cfg = CapacityConfig(0.75, policy=policy, scope=scope, backend=backend, reroute_rounds=4)
    with HostSyncRecorder() as syncs:
        plan = plan_routing(scores, routing_map, cfg, layout=LAYOUT, topk=TOPK, validate=False,
                            eligible=eligible)
    assert syncs.ops == []
    local = LAYOUT.expert_to_rank.unsqueeze(0) == 0  # this rank hosts experts 0 and 1
    ref_map, ref_probs, _ = reference_plan(
        scores, routing_map, cfg, local_experts=local.expand(40, -1), expert_to_rank=LAYOUT.expert_to_rank,
        eligible=eligible | routing_map)
    assert torch.equal(plan.routing_map, ref_map)
    torch.testing.assert_close(plan.probs, ref_probs)
    moved = plan.routing_map & ~routing_map
    assert moved.any(), "the case must move something for the mask to matter"
    assert not (moved & ~eligible).any()


def test_without_the_mask_the_plan_moves_to_ineligible_experts():
    """The mask is what keeps tokens in their groups: the same plan without it leaves them."""
    scores, routing_map = skewed_routing(40, NUM_EXPERTS, TOPK, skew=2.0, seed=3)
    cfg = CapacityConfig(0.75, policy="reroute", reroute_rounds=4)
    plan = plan_routing(scores, routing_map, cfg, layout=LAYOUT)
    assert ((plan.routing_map & ~routing_map) & ~_groups_of_picks(routing_map)).any()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), gamma=st.sampled_from([0.5, 0.75, 1.0]),
       policy=st.sampled_from(["reroute", "expanded"]), density=st.floats(0.0, 1.0))
def test_nothing_is_placed_on_an_ineligible_expert(seed, gamma, policy, density):
    scores, routing_map = skewed_routing(24, NUM_EXPERTS, TOPK, skew=1.5, seed=seed)
    eligible = torch.rand(scores.shape, generator=torch.Generator().manual_seed(seed)) < density
    cfg = CapacityConfig(gamma, policy=policy, scope="device", reroute_rounds=3)
    plan = plan_routing(scores, routing_map, cfg, layout=LAYOUT, eligible=eligible)
    assert not ((plan.routing_map & ~routing_map) & ~eligible).any()
    loads = plan.tokens_per_expert_after.view(LAYOUT.num_ranks, -1).sum(1)
    assert int(loads.max()) <= int(plan.capacity)


def test_a_malformed_mask_is_refused():
    scores, routing_map = skewed_routing(8, NUM_EXPERTS, TOPK)
    with pytest.raises(ValueError, match="eligible must be a \\[T, E\\] bool mask"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, policy="reroute"),
                     eligible=torch.ones(8, NUM_EXPERTS - 1, dtype=torch.bool))
