"""The torch planner against the loop reference, over policies, priorities, scopes, shapes, dtypes."""

import math

import pytest
import torch
from reference import reference_plan
from capaware_megatron.synthetic import skewed_routing

from capaware_megatron import CapacityConfig, plan_routing

SHAPES = [
    (0, 8, 2),  # empty batch
    (1, 1, 1),  # a single expert takes everything
    (7, 3, 3),  # k == E: every token uses every expert
    (33, 5, 2),  # prime E, T not a multiple of anything
    (100, 16, 4),
    (257, 64, 8),  # DeepSeek-like k with many experts
    (1024, 8, 2),  # Mixtral-like
    (600, 128, 6),  # the largest E of the issue
]
DTYPES = [torch.float32, torch.bfloat16]


def _device_map(num_experts: int) -> list[int]:
    """Two experts per EP rank when E is even, else one."""
    per_rank = 2 if num_experts % 2 == 0 else 1
    return [e // per_rank for e in range(num_experts)]


def _check_against_reference(scores, routing_map, cfg, **kw):
    plan = plan_routing(scores, routing_map, cfg, **kw)
    ref_map, ref_probs, ref_cap = reference_plan(
        scores, routing_map, cfg, kw.get("local_experts", ()), kw.get("expert_to_rank"),
        kw.get("probs"), kw.get("training", False),
    )
    torch.testing.assert_close(plan.routing_map, ref_map, rtol=0, atol=0)
    tol = 1e-6 if plan.probs.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(plan.probs, ref_probs, rtol=tol, atol=tol)
    assert plan.capacity == ref_cap
    assert torch.equal(plan.tokens_per_expert_after, ref_map.sum(0))
    assert torch.equal(plan.tokens_per_expert_before, routing_map.sum(0))
    return plan


@pytest.mark.parametrize("num_tokens,num_experts,topk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("scope", ["local", "device", "global"])
def test_matches_reference_score(num_tokens, num_experts, topk, dtype, policy, scope):
    scores, routing_map = skewed_routing(num_tokens, num_experts, topk, skew=1.5, dtype=dtype)
    cfg = CapacityConfig(capacity_factor=1.0, policy=policy, scope=scope)
    _check_against_reference(
        scores, routing_map, cfg,
        local_experts=[0, num_experts - 1], expert_to_rank=_device_map(num_experts),
    )


@pytest.mark.parametrize("num_tokens,num_experts,topk", [(33, 5, 2), (300, 16, 4)])
@pytest.mark.parametrize("priority", ["score", "position", "reverse", "random"])
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("scope", ["local", "device", "global"])
@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_matches_reference_all_priorities(
    num_tokens, num_experts, topk, priority, policy, scope, gamma
):
    scores, routing_map = skewed_routing(num_tokens, num_experts, topk, skew=2.0, seed=3)
    cfg = CapacityConfig(gamma, policy=policy, priority=priority, scope=scope, seed=7)
    _check_against_reference(
        scores, routing_map, cfg, local_experts=[1, 2], expert_to_rank=_device_map(num_experts)
    )


@pytest.mark.parametrize("expert_to_rank", [[1, 0, 3, 2, 5, 4, 7, 6], [3, 2, 1, 0, 3, 2, 1, 0], [2, 0, 1, 3, 0, 1, 3, 2]])
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("gamma", [0.6, 1.0])
def test_device_scope_with_experts_not_in_rank_order(expert_to_rank, policy, gamma):
    """EP ranks need not hold contiguous experts, one expert each or several: each rank's cap
    holds and the plan is the reference's."""
    scores, routing_map = skewed_routing(300, 8, 2, skew=2.0, seed=5)
    cfg = CapacityConfig(gamma, policy=policy, scope="device", reroute_rounds=8)
    plan = _check_against_reference(scores, routing_map, cfg, local_experts=[0, 5], expert_to_rank=expert_to_rank)
    per_rank = torch.zeros(max(expert_to_rank) + 1, dtype=torch.int64).index_add_(
        0, torch.tensor(expert_to_rank), plan.tokens_per_expert_after)
    assert int(per_rank.max()) <= plan.capacity


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
def test_renormalize_and_router_probs(policy):
    scores, routing_map = skewed_routing(200, 8, 2, skew=2.0)
    # Megatron-style combine weights: softmax over the top-k only, times a scaling factor.
    probs = torch.where(routing_map, scores, 0)
    probs = 2.5 * probs / probs.sum(1, keepdim=True)
    cfg = CapacityConfig(1.0, policy=policy, renormalize=True)
    plan = _check_against_reference(scores, routing_map, cfg, probs=probs, local_experts=[3])
    alive = plan.routing_map.any(1)
    torch.testing.assert_close(plan.probs.sum(1)[alive], torch.full_like(alive, 2.5, dtype=torch.float32)[alive])


def test_capacity_formula_matches_megatron_order():
    # 1.1 * 100 / 1 = 110.00000000000001 in floats: Megatron's order of operations gives 111.
    scores, routing_map = skewed_routing(100, 2, 1)
    plan = plan_routing(scores, routing_map, CapacityConfig(1.1))
    assert plan.capacity == math.ceil((100 * 1 / 2) * 1.1)


def test_dropless_and_training_are_identity():
    scores, routing_map = skewed_routing(64, 8, 2, skew=3.0)
    for cfg, training in [
        (CapacityConfig(None), False),
        (CapacityConfig(policy="none"), False),
        (CapacityConfig(0.5), True),
    ]:
        plan = plan_routing(scores, routing_map, cfg, training=training)
        assert torch.equal(plan.routing_map, routing_map)
        assert torch.equal(plan.probs, scores * routing_map)
        assert int(plan.num_dropped) == 0 and int(plan.num_rerouted) == 0
    plan = plan_routing(scores, routing_map, CapacityConfig(0.5, apply_in_training=True), training=True)
    assert int(plan.num_dropped) > 0


def test_decode_guard():
    # 4 tokens x top-2 over 8 experts: mean load 1 < min_capacity 2, so nothing is capped even
    # though all tokens pick the same experts.
    scores = torch.tensor([[0.6, 0.3] + [0.1 / 6] * 6] * 4)
    routing_map = torch.zeros(4, 8, dtype=torch.bool)
    routing_map[:, :2] = True
    plan = plan_routing(scores, routing_map, CapacityConfig(1.0, min_capacity=2))
    assert torch.equal(plan.routing_map, routing_map)
    # At 8 tokens the mean load reaches 2: the cap is max(ceil(2 * 1.0), 2) = 2.
    plan = plan_routing(scores.repeat(2, 1), routing_map.repeat(2, 1), CapacityConfig(1.0, min_capacity=2))
    assert plan.capacity == 2 and plan.tokens_per_expert_after.tolist()[:2] == [2, 2]


def test_all_tokens_on_one_expert_and_ties():
    # Every score equal: ties resolve to the earliest tokens (documented tie-break).
    scores = torch.full((10, 4), 0.25)
    routing_map = torch.zeros(10, 4, dtype=torch.bool)
    routing_map[:, 0] = True
    plan = plan_routing(scores, routing_map, CapacityConfig(1.0))
    assert plan.capacity == 3
    assert plan.routing_map[:, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert int(plan.num_dropped) == 7
    rev = plan_routing(scores, routing_map, CapacityConfig(1.0, priority="reverse"))
    assert rev.routing_map[:, 0].nonzero().flatten().tolist() == [7, 8, 9]
    # Rerouting fills experts 1..3 in token order (ties in score go to the lower expert).
    rr = plan_routing(scores, routing_map, CapacityConfig(1.0, policy="reroute"))
    assert rr.tokens_per_expert_after.tolist() == [3, 3, 3, 1]
    assert int(rr.num_rerouted) == 7 and int(rr.num_dropped) == 0
    assert rr.routing_map[3:6, 1].all() and rr.routing_map[9, 3]


def test_reroute_places_nearly_all_overflow():
    scores, routing_map = skewed_routing(4096, 64, 8, skew=2.0)
    drop = plan_routing(scores, routing_map, CapacityConfig(1.0))
    reroute = plan_routing(scores, routing_map, CapacityConfig(1.0, policy="reroute"))
    lost = int(drop.num_dropped)
    assert lost > 0.1 * 4096 * 8  # a real overflow
    assert int(reroute.num_rerouted) >= 0.99 * lost
    assert torch.equal(reroute.routing_map & routing_map, drop.routing_map)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be > 0"),
        (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
        (dict(capacity_factor=float("nan")), ValueError, "capacity_factor"),
        (dict(capacity_factor="1.5"), TypeError, "capacity_factor"),
        (dict(capacity_factor=1.5, policy="none"), ValueError, "policy='none'"),
        (dict(policy="reroute"), ValueError, "policy='reroute' needs a capacity_factor"),
        (dict(capacity_factor=None, policy="drop"), ValueError, "policy='drop' needs a capacity_factor"),
        (dict(policy="expanded"), ValueError, "needs a capacity_factor"),
        (dict(policy="dropp"), ValueError, "policy must be one of"),
        (dict(priority="prob"), ValueError, "priority must be one of"),
        (dict(scope="expert"), ValueError, "scope must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(min_capacity=-1), ValueError, "min_capacity must be >= 0"),
        (dict(min_capacity=1.5), TypeError, "min_capacity must be an int"),
        (dict(renormalize="yes"), TypeError, "renormalize must be a bool"),
        (dict(seed=-3), ValueError, "seed"),
        (dict(capacity_factor=1.0, decode_capacity_factor=0), ValueError, "decode_capacity_factor must be > 0"),
        (dict(decode_capacity_factor=-2.0), ValueError, "decode_capacity_factor must be > 0"),
        (dict(decode_capacity_factor="2"), TypeError, "decode_capacity_factor must be a positive number"),
        (dict(decode_capacity_factor=1.0, policy="none"), ValueError, "decode_capacity_factor=1.0 has no effect"),
        (dict(capacity_factor=1.0, min_capacity=64, max_tokens_per_rank=32), ValueError,
         "min_capacity=64 is larger than max_tokens_per_rank=32"),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CapacityConfig(**kwargs)


def test_policy_default_follows_the_capacity_factor():
    assert CapacityConfig().policy == "none" and CapacityConfig().is_dropless
    assert CapacityConfig(1.5).policy == "drop"
    assert CapacityConfig(None, policy="none").is_dropless
    assert CapacityConfig(1.5, policy="reroute").policy == "reroute"


def test_decode_factor_gives_decode_steps_their_own_gamma():
    both = CapacityConfig(1.0, decode_capacity_factor=2.0, policy="reroute")
    assert both.for_decode() == CapacityConfig(2.0, policy="reroute")
    assert CapacityConfig(1.5).for_decode() == CapacityConfig(1.5)  # default: the prefill factor
    decode_only = CapacityConfig(decode_capacity_factor=1.0)
    assert decode_only.policy == "drop" and decode_only.is_dropless and not decode_only.for_decode().is_dropless


def test_config_as_a_mapping():
    scores, routing_map = skewed_routing(64, 8, 2)
    want = plan_routing(scores, routing_map, CapacityConfig(1.0, priority="position"))
    got = plan_routing(scores, routing_map, {"capacity_factor": 1.0, "priority": "position"})
    assert torch.equal(got.routing_map, want.routing_map) and torch.equal(got.probs, want.probs)
    assert int(want.num_dropped) > 0
    with pytest.raises(ValueError, match=r"unknown CapacityConfig field\(s\) \['gamma'\]"):
        plan_routing(scores, routing_map, {"gamma": 1.0})
    with pytest.raises(TypeError, match="cfg must be a CapacityConfig or a mapping"):
        plan_routing(scores, routing_map, 1.0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        plan_routing(scores, routing_map, {"capacity_factor": -1.0})


def test_input_errors():
    scores, routing_map = skewed_routing(16, 4, 2)
    cfg = CapacityConfig(1.0)
    with pytest.raises(ValueError, match="scores must be"):
        plan_routing(scores[0], routing_map, cfg)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        plan_routing(scores.double(), routing_map, cfg)
    with pytest.raises(ValueError, match="routing_map shape"):
        plan_routing(scores, routing_map[:, :3], cfg)
    with pytest.raises(TypeError, match="routing_map must be torch.bool"):
        plan_routing(scores, routing_map.int(), cfg)
    for bad in (float("nan"), float("inf"), -float("inf")):
        nonfinite = scores.clone()
        nonfinite[3, 1] = bad
        with pytest.raises(ValueError, match="scores must be finite"):
            plan_routing(nonfinite, routing_map, cfg)
        with pytest.raises(ValueError, match="probs must be finite"):
            plan_routing(scores, routing_map, cfg, probs=nonfinite * routing_map)
    ragged = routing_map.clone()
    ragged[0] = True
    with pytest.raises(ValueError, match="same number"):
        plan_routing(scores, ragged, cfg)
    with pytest.raises(ValueError, match="topk must be in"):
        plan_routing(scores, routing_map, cfg, topk=5)
    with pytest.raises(ValueError, match="exactly topk=1"):
        plan_routing(scores, routing_map, cfg, topk=1)
    with pytest.raises(ValueError, match="needs local_experts"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, policy="expanded"))
    with pytest.raises(ValueError, match="local_experts must lie"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, policy="expanded"), local_experts=[4])
    with pytest.raises(ValueError, match="needs expert_to_rank"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, scope="device"))
    with pytest.raises(ValueError, match="same number of experts"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, scope="device"), expert_to_rank=[0, 0, 0, 1])
    with pytest.raises(ValueError, match="expected num_experts=4"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, scope="device"), expert_to_rank=[0, 1])
    with pytest.raises(ValueError, match="probs must match"):
        plan_routing(scores, routing_map, cfg, probs=scores[:3])


@pytest.mark.parametrize("rounds", [1, 2, 3, 16])
@pytest.mark.parametrize("scope", ["local", "device"])
@pytest.mark.parametrize("weight", ["score", "carry"])
def test_reroute_rounds_match_the_loop_reference(rounds, scope, weight):
    scores, routing_map = skewed_routing(300, 16, 4, skew=2.0, seed=9)
    probs = torch.where(routing_map, scores * 1.7, 0)  # router weights unlike the scores
    cfg = CapacityConfig(0.75, policy="reroute", scope=scope, reroute_rounds=rounds, reroute_weight=weight)
    plan = _check_against_reference(scores, routing_map, cfg, expert_to_rank=_device_map(16), probs=probs)
    assert int(plan.num_rerouted) > 100
    rerouted = plan.routing_map & ~routing_map
    if weight == "carry":  # a token's rerouted weights are weights its router gave
        assert not torch.equal(plan.probs[rerouted], scores[rerouted])


def test_more_rounds_place_more_and_approach_the_serial_greedy():
    """Each round can only add placements; the default places >= 99% of what the exact serial
    greedy places on a skewed router (the measured choice of DEFAULT_REROUTE_ROUNDS)."""
    scores, routing_map = skewed_routing(1024, 64, 8, skew=2.0, seed=1)
    exact_map, _, _ = reference_plan(scores, routing_map, CapacityConfig(1.0, policy="reroute"), exact_reroute=True)
    exact = int((exact_map & ~routing_map).sum())
    placed = [int(plan_routing(scores, routing_map, CapacityConfig(1.0, policy="reroute", reroute_rounds=r)).num_rerouted)
              for r in (1, 2, 4, 5)]
    assert placed == sorted(placed) and placed[0] < placed[-1]
    default = plan_routing(scores, routing_map, CapacityConfig(1.0, policy="reroute"))
    assert int(default.num_rerouted) >= 0.99 * exact
