"""Hypothesis: invariants of the plan for arbitrary routings and configurations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capaware_megatron import CapacityConfig, RoutingGroup, expert_capacity, plan_routing
from capaware_megatron.ops import kth_largest
from capaware_megatron.ops.routing_plan import CPU_RADIX_SORT_MIN, sort_small_ints
from capaware_megatron.priority import NOT_ROUTED


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 12))
    topk = draw(st.integers(1, num_experts))
    num_tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    # Coarse logits make ties frequent: tie-breaks are part of what is tested.
    logits = torch.randint(0, draw(st.integers(1, 6)), (num_tokens, num_experts), generator=gen)
    bias = torch.randn(num_experts, generator=gen) * draw(st.floats(0, 4))
    scores = (logits.float() + bias).softmax(-1)
    top = torch.topk(scores + 1e-4 * torch.rand(scores.shape, generator=gen), topk, dim=1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, top, True)
    divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
    per_rank = draw(st.sampled_from(divisors))
    # EP ranks need not hold contiguous experts: any balanced mapping.
    slot = draw(st.permutations(range(num_experts)))
    expert_to_rank = [slot[e] // per_rank for e in range(num_experts)]
    local = draw(st.sets(st.integers(0, num_experts - 1), max_size=num_experts))
    cfg = CapacityConfig(
        capacity_factor=(factor := draw(st.one_of(st.none(), st.floats(0.05, 3.0)))),
        policy=draw(st.sampled_from(["drop", "reroute", "expanded"] if factor is not None else ["none"])),
        priority=draw(st.sampled_from(["score", "position", "reverse", "random"])),
        scope=draw(st.sampled_from(["local", "device", "global"])),
        min_capacity=draw(st.integers(0, 3)),
        renormalize=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
    return scores, routing_map, cfg, sorted(local), expert_to_rank


def _plan(scores, routing_map, cfg, local, expert_to_rank):
    return plan_routing(
        scores, routing_map, cfg, local_experts=local, expert_to_rank=expert_to_rank
    )


@settings(max_examples=300, deadline=None)
@given(routings())
def test_plan_invariants(case):
    scores, routing_map, cfg, local, expert_to_rank = case
    plan = _plan(*case)
    num_tokens, num_experts = scores.shape
    new_map = plan.routing_map
    load = new_map.sum(0)
    assert torch.equal(load, plan.tokens_per_expert_after)

    topk = int(routing_map[0].sum()) if num_tokens else 0
    decode = num_tokens * topk < cfg.min_capacity * num_experts or num_tokens == 0
    if cfg.capacity_factor is None or decode:  # dropless, and decode-sized steps, are the identity
        assert torch.equal(new_map, routing_map)
        assert torch.equal(plan.probs, scores * routing_map)
        return

    # The cap is never exceeded, per expert or per EP rank.
    if cfg.scope == "device":
        bins = torch.tensor(expert_to_rank)
        per_bin = torch.zeros(int(bins.max()) + 1, dtype=torch.int64).index_add_(0, bins, load)
        assert int(per_bin.max()) <= plan.capacity
    else:
        assert int(load.max()) <= plan.capacity

    # Weights are zero exactly off the map.
    assert not plan.probs[~new_map].any()
    if not cfg.renormalize:
        assert torch.equal(plan.probs[new_map], scores[new_map])
    else:
        alive = new_map.any(1)
        torch.testing.assert_close(plan.probs.sum(1)[alive], scores.mul(routing_map).sum(1)[alive])

    extra = len(local) if cfg.policy == "expanded" else 0
    # Reroute moves assignments, never adds any: a token keeps at most k experts.
    assert int(new_map.sum(1).max()) if num_tokens else 0 <= topk + extra
    added = new_map & ~routing_map
    if cfg.policy == "drop":
        assert not added.any()
    if cfg.policy == "expanded":
        assert not (added & ~torch.isin(torch.arange(num_experts), torch.tensor(local, dtype=torch.long))).any()

    # Dropped only under overflow: an expert (bin) within capacity keeps all its candidates.
    candidates = routing_map.clone()
    if cfg.policy == "expanded" and local:
        candidates[:, local] = True
    lost = candidates & ~new_map
    bin_of = torch.tensor(expert_to_rank) if cfg.scope == "device" else torch.arange(num_experts)
    demand = torch.zeros(int(bin_of.max()) + 1, dtype=torch.int64).index_add_(0, bin_of, candidates.sum(0))
    for e in lost.any(0).nonzero().flatten().tolist():
        assert int(demand[bin_of[e]]) > plan.capacity

    assert int(plan.num_dropped) + int((routing_map & new_map).sum()) + (
        int(plan.num_rerouted) if cfg.policy == "reroute" else 0
    ) == int(routing_map.sum())


@settings(max_examples=150, deadline=None)
@given(routings())
def test_reroute_keeps_what_drop_keeps_and_is_maximal(case):
    scores, routing_map, cfg, local, expert_to_rank = case
    if cfg.capacity_factor is None:
        return
    drop = _plan(scores, routing_map, CapacityConfig(**{**cfg.__dict__, "policy": "drop"}), local, expert_to_rank)
    rounds = [1, 2, int(routing_map.sum()) + 1]  # the last is enough: every round places one or ends
    plans = [_plan(scores, routing_map, CapacityConfig(**{**cfg.__dict__, "policy": "reroute", "reroute_rounds": r}),
                   local, expert_to_rank) for r in rounds]
    for reroute in plans:
        assert torch.equal(reroute.routing_map & routing_map, drop.routing_map & routing_map)
    # More rounds only add placements.
    assert all(bool((a.routing_map <= b.routing_map).all()) for a, b in zip(plans, plans[1:]))
    reroute = plans[-1]
    if int(reroute.num_dropped) == 0:
        return
    # With enough rounds whatever stays dropped found no room: every expert its token does not use is full.
    bin_of = torch.tensor(expert_to_rank) if cfg.scope == "device" else torch.arange(scores.shape[1])
    load = torch.zeros(int(bin_of.max()) + 1, dtype=torch.int64).index_add_(
        0, bin_of, reroute.routing_map.sum(0)
    )
    full = load[bin_of] >= reroute.capacity
    dropped_tokens = (routing_map.sum(1) > reroute.routing_map.sum(1)).nonzero().flatten()
    for t in dropped_tokens.tolist():
        assert bool((full | routing_map[t] | reroute.routing_map[t]).all())


@settings(max_examples=60, deadline=None)
@given(routings(), st.integers(0, 2**32 - 1))
def test_deterministic_for_a_fixed_seed(case, other_seed):
    scores, routing_map, cfg, local, expert_to_rank = case
    first, second = _plan(*case), _plan(*case)
    assert torch.equal(first.routing_map, second.routing_map)
    assert torch.equal(first.probs, second.probs)


@settings(max_examples=300, deadline=None)
@given(
    num_tokens=st.integers(0, 2**24), topk=st.integers(1, 16), num_bins=st.integers(1, 512),
    gamma=st.floats(0.01, 8.0), min_capacity=st.integers(0, 8),
)
def test_capacity_on_the_device_equals_the_host_formula(num_tokens, topk, num_bins, gamma, min_capacity):
    """Global scope keeps the group's token count on the device: C computed there must be the
    host formula's (Megatron-Core's float64 order), or ranks and frameworks would disagree."""
    host = expert_capacity(num_tokens, topk, num_bins, gamma, min_capacity)
    device = expert_capacity(torch.tensor(num_tokens), torch.tensor(topk), num_bins, gamma, min_capacity)
    assert device.dtype == torch.int64 and device.dim() == 0 and int(device) == host


@settings(max_examples=200, deadline=None)
@given(
    num_bins=st.integers(1, 6), length=st.integers(0, 40), seed=st.integers(0, 2**16),
    spread=st.sampled_from([4, 2**20, 2**62]), data=st.data(),
)
def test_kth_largest_is_the_kth_largest(num_bins, length, seed, spread, data):
    """The radix select over digit histograms equals sorting: keys over the whole int64 range
    (random priority reaches both signs) or crowded in a few values' low bits, NOT_ROUTED
    padding, kth beyond what a bin holds (NOT_ROUTED), alone and as a group of one."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(-spread, spread, (num_bins, length), generator=gen, dtype=torch.int64)
    # Unique per bin, as priority keys are: distinct low bits.
    keys = keys * 64 + torch.arange(length).remainder(64)
    keys = keys.masked_fill(torch.rand(num_bins, length, generator=gen) < 0.3, NOT_ROUTED)
    kth = torch.tensor(data.draw(st.lists(st.integers(1, length + 2), min_size=num_bins, max_size=num_bins)))
    bins = torch.arange(num_bins).unsqueeze(1).expand_as(keys).reshape(-1)
    order = torch.randperm(bins.numel(), generator=gen)  # bins need not be contiguous
    got = kth_largest(keys.reshape(-1)[order], bins[order], num_bins, kth)
    alone = RoutingGroup(0, 1, lambda tensor: tensor.unsqueeze(0))
    assert torch.equal(kth_largest(keys.reshape(-1), bins, num_bins, kth, alone), got)
    for b in range(num_bins):
        real = sorted((int(v) for v in keys[b] if int(v) != NOT_ROUTED), reverse=True)
        want = real[int(kth[b]) - 1] if int(kth[b]) <= len(real) else NOT_ROUTED
        assert int(got[b]) == want


@settings(max_examples=60, deadline=None)
@given(
    num_values=st.sampled_from([1, 2, 9, 256, 257, 2**15, 2**15 + 1]),
    length=st.one_of(st.integers(0, 64), st.integers(CPU_RADIX_SORT_MIN // 6 - 4, CPU_RADIX_SORT_MIN // 6 + 4),
                     st.integers(CPU_RADIX_SORT_MIN - 8, CPU_RADIX_SORT_MIN + 8)),
    seed=st.integers(0, 2**16),
)
def test_sort_small_ints_is_the_stable_sort(num_values, length, seed):
    """The narrowed (and on CPU padded) sort equals a stable int64 sort: values and indices,
    either side of the lengths from which it pads and from which torch's CPU sort runs its
    radix sort, every narrow type (uint8 / int16 / int32), the largest value (the padding's)
    present or not."""
    values = torch.randint(0, num_values, (length,), generator=torch.Generator().manual_seed(seed))
    got_values, got_indices = sort_small_ints(values, num_values)
    want = torch.sort(values, stable=True)
    assert got_indices.dtype == torch.int64
    assert torch.equal(got_values.long(), want.values) and torch.equal(got_indices, want.indices)


@pytest.mark.parametrize("num_experts,topk,per_bin", [(8, 2, 1), (16, 4, 4), (64, 2, 1), (12, 3, 6)])
@pytest.mark.parametrize("capacity", [1, 5, 40, 200])
@pytest.mark.parametrize("dense", [True, False])
def test_bin_thresholds_dense_and_sorted_paths(monkeypatch, num_experts, topk, per_bin, capacity, dense):
    """Both ways bin_thresholds finds each bin's capacity-th key (dense rows + topk, or sorting
    the listed keys by bin) give the sorted reference, bins of one expert or several."""
    from capaware_megatron.ops import routing_plan
    from capaware_megatron.priority import listed_keys
    from capaware_megatron.synthetic import skewed_routing

    monkeypatch.setattr(routing_plan, "DENSE_EXPERTS_PER_CANDIDATE", 10**6 if dense else 0)
    scores, routing_map = skewed_routing(90, num_experts, topk, skew=2.0, seed=capacity)
    bin_experts = torch.randperm(num_experts, generator=torch.Generator().manual_seed(3)).view(-1, per_bin)
    items, _, _ = routing_plan.collect_candidates(scores, routing_map, routing_map, None, "random", 7, 0, topk)
    got = routing_plan.bin_thresholds(items, bin_experts, capacity)
    every_expert = torch.arange(num_experts).expand(90, -1)
    dense_keys = listed_keys(scores, every_expert, routing_map, "random", 7)
    for b, experts in enumerate(bin_experts.tolist()):
        real = sorted((v for v in dense_keys[:, experts].reshape(-1).tolist() if v != NOT_ROUTED), reverse=True)
        assert int(got[b]) == (real[capacity - 1] if capacity <= len(real) else NOT_ROUTED)
