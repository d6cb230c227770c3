"""Triton kernels against the torch planner (interpreter on CPU) and compiled for Hopper."""

import pytest
import torch

from capaware_megatron import CapacityConfig, ops, planner, plan_routing, priority
from capaware_megatron.synthetic import skewed_routing

kernels = pytest.importorskip("capaware_megatron.kernels")

# The interpreter on CPU (conftest sets TRITON_INTERPRET=1 there); the compiled kernels on a GPU
# (`make gpu-check`). Inputs are made on the CPU (seeded generators) and moved.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _routing(*args, **kwargs):
    """skewed_routing(...) on DEVICE."""
    return tuple(t.to(DEVICE) for t in skewed_routing(*args, **kwargs))


def _on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)

SHAPES = [
    (0, 8, 2),  # empty batch
    (1, 1, 1),  # one token, one expert
    (5, 3, 3),  # k == E
    (37, 7, 2),  # prime E, T below one block
    (200, 32, 16),  # the largest k of the issue
    (64, 512, 8),  # the largest E of the issue (E > BLOCK_E: several column blocks)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _with_local_candidates(routing_map):
    """Expanded drop's candidates: the router's picks plus expert 0 (a local expert) everywhere."""
    candidates = routing_map.clone()
    candidates[:, 0] = True
    return candidates


def _lists_as_columns(lists, num_tokens):
    """The Triton per-expert lists as the torch twin's [T, E] keys (NOT_ROUTED off the lists)."""
    num_experts = lists.keys.shape[0]
    keys = torch.full((num_tokens, num_experts), priority.NOT_ROUTED, dtype=torch.int64, device=lists.keys.device)
    for expert in range(num_experts):
        column = lists.keys[expert, : int(lists.counts[expert])]
        tokens = priority.decode_token(column, num_experts, lists.token_offset)
        assert not keys[tokens, expert].ne(priority.NOT_ROUTED).any(), "a token listed twice"
        keys[tokens, expert] = column
    return keys


def _items_as_columns(items, num_experts):
    """The torch twin's listed candidates as [T, E] keys (NOT_ROUTED off the candidates)."""
    keys = torch.full((items.keys.shape[0], num_experts), priority.NOT_ROUTED, dtype=torch.int64,
                      device=items.keys.device)
    return keys.scatter_(1, items.experts, items.keys)


@pytest.mark.parametrize("num_tokens,num_experts,topk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prio", ["score", "position", "reverse", "random"])
def test_collect_candidates_bit_exact(num_tokens, num_experts, topk, dtype, prio):
    scores, routing_map = _routing(num_tokens, num_experts, topk, dtype=dtype, skew=1.0)
    candidates = _with_local_candidates(routing_map)
    # Router weights: none (position), the scores' dtype, or fp32 beside lower-precision scores.
    probs_dtype = torch.float32 if prio == "random" else dtype
    probs = (scores.float() * routing_map * 1.7).to(probs_dtype) if prio != "position" else None
    args = (scores, candidates, routing_map, probs, prio, 11, 3)
    lists, keep, weights = kernels.collect_candidates(*args)
    want_items, want_keep, want_weights = ops.collect_candidates(*args)
    assert torch.equal(lists.counts.long(), candidates.sum(0))
    assert torch.equal(_lists_as_columns(lists, num_tokens), _items_as_columns(want_items, num_experts))
    assert torch.equal(keep, want_keep)
    assert torch.equal(weights, want_weights)


def test_collect_candidates_non_contiguous_inputs():
    scores, routing_map = _routing(40, 12, 3, skew=1.0)
    probs = scores * routing_map
    column_major = [t.t().contiguous().t() for t in (scores, routing_map, probs)]
    assert not column_major[0].is_contiguous()
    lists, keep, weights = kernels.collect_candidates(
        column_major[0], column_major[1], column_major[1], column_major[2], "score"
    )
    want_items, want_keep, want_weights = ops.collect_candidates(
        scores, routing_map, routing_map, probs, "score"
    )
    assert torch.equal(_lists_as_columns(lists, 40), _items_as_columns(want_items, 12))
    assert torch.equal(keep, want_keep) and torch.equal(weights, want_weights)


def _both_states(scores, candidates, prio="score", seed=0):
    """(Triton lists, torch keys) of the same candidates."""
    args = (scores, candidates, candidates, None, prio, seed)
    return kernels.collect_candidates(*args)[0], ops.collect_candidates(*args)[0]


@pytest.mark.parametrize(
    "num_tokens,num_experts,topk,per_bin",
    [(t, e, k, 1) for t, e, k in SHAPES[1:5]]
    + [(t, e, k, e) for t, e, k in SHAPES[1:5]]
    + [(64, 512, 8, 64)],  # 512 experts in 8 device bins (one program per bin: interpreter speed)
)
@pytest.mark.parametrize("capacity", [1, 3, 17, 1000])
def test_thresholds_and_top_keys_match_torch(num_tokens, num_experts, topk, per_bin, capacity):
    scores, routing_map = _routing(num_tokens, num_experts, topk, skew=2.0)
    bin_experts = torch.randperm(num_experts).view(-1, per_bin).to(DEVICE)  # bins need not be contiguous
    lists, keys = _both_states(scores, routing_map)
    got = kernels.bin_thresholds(lists, bin_experts, capacity)
    assert torch.equal(got, ops.bin_thresholds(keys, bin_experts, capacity))
    # Global scope's per-bin top keys: the same set (the kernel leaves them unordered).
    got_top = kernels.bin_top_keys(lists, bin_experts, capacity)
    want_top = ops.bin_top_keys(keys, bin_experts, capacity)
    assert torch.equal(got_top.sort(1, descending=True).values, want_top)


def test_thresholds_on_ties_and_extreme_keys():
    # Equal scores everywhere (ties broken by the low bits) and negative keys (random priority).
    scores, routing_map, bin_experts = _on_device(
        torch.full((50, 4), 0.25), torch.ones(50, 4, dtype=torch.bool), torch.arange(4).view(4, 1))
    for prio in ["score", "random", "position"]:
        lists, keys = _both_states(scores, routing_map, prio, seed=2**32 - 1)
        for capacity in (1, 2, 25, 49, 50, 51):
            got = kernels.bin_thresholds(lists, bin_experts, capacity)
            assert torch.equal(got, ops.bin_thresholds(keys, bin_experts, capacity))


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("scope", ["local", "device", "global"])
@pytest.mark.parametrize("prio", ["score", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planner_backends_agree(policy, scope, prio, dtype):
    scores, routing_map = _routing(96, 8, 2, skew=2.0, dtype=dtype)
    # Router weights given (and renormalized) for score priority, defaulted for random.
    probs = (scores * routing_map * 1.3).to(dtype) if prio == "score" else None
    kwargs = dict(local_experts=[0, 1], expert_to_rank=[0, 0, 1, 1, 2, 2, 3, 3], probs=probs)
    plans = [
        plan_routing(
            scores, routing_map,
            CapacityConfig(
                1.0, policy=policy, scope=scope, priority=prio, backend=backend,
                renormalize=probs is not None,
            ),
            **kwargs,
        )
        for backend in ("torch", "triton")
    ]
    for field in ("routing_map", "probs", "tokens_per_expert_before", "tokens_per_expert_after",
                  "num_dropped", "num_rerouted"):
        assert torch.equal(getattr(plans[0], field), getattr(plans[1], field)), field
    assert plans[0].capacity == plans[1].capacity


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
def test_triton_plan_passes_gradients_like_torch(policy):
    # Training with capacity: the router learns through the plan's combine weights.
    scores, routing_map = _routing(64, 8, 2, skew=2.0)
    grads = []
    for backend in ("torch", "triton"):
        leaf_scores = scores.clone().requires_grad_()
        leaf_probs = (scores * routing_map * 1.3).requires_grad_()
        plan = plan_routing(
            leaf_scores, routing_map,
            CapacityConfig(1.0, policy=policy, backend=backend, apply_in_training=True),
            probs=leaf_probs, local_experts=[0, 1], training=True,
        )
        weights = torch.arange(8.0, device=DEVICE) + 1  # per-expert weights: gradients differ by expert
        (plan.probs * weights).sum().backward()
        grads.append((leaf_scores.grad, leaf_probs.grad, plan.routing_map))
    assert torch.equal(grads[0][2], grads[1][2])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[1][1].abs().sum() > 0  # kept router picks pass gradient to probs
    if policy != "drop":  # rerouted / local candidates take their score: gradient to scores
        assert grads[1][0].abs().sum() > 0


@pytest.mark.parametrize("num_tokens,num_experts,topk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permutation_indices(num_tokens, num_experts, topk, dtype):
    scores, routing_map = _routing(num_tokens, num_experts, topk, dtype=dtype)
    probs = scores * routing_map
    sorted_indices, permuted_probs, counts = kernels.permutation_indices(routing_map, probs)
    # Megatron-Core's permute order: expert-major, tokens ascending within an expert.
    tokens = torch.arange(num_tokens, device=DEVICE).unsqueeze(0).expand(num_experts, -1)
    assert torch.equal(sorted_indices, tokens.masked_select(routing_map.T))
    assert torch.equal(permuted_probs, probs.T.contiguous().masked_select(routing_map.T))
    assert torch.equal(counts, routing_map.sum(0))
    # Round trip: gather into expert order, scatter back, each token gets its k copies.
    hidden = torch.randn(num_tokens, 4, device=DEVICE)
    back = torch.zeros_like(hidden).index_add_(0, sorted_indices, hidden[sorted_indices])
    torch.testing.assert_close(back, hidden * routing_map.sum(1, keepdim=True))


def test_permuted_probs_pass_gradients():
    scores, routing_map = _routing(50, 8, 2)
    probs = (scores * routing_map).requires_grad_()
    _, permuted_probs, _ = kernels.permutation_indices(routing_map, probs)
    (permuted_probs * torch.arange(permuted_probs.shape[0], device=DEVICE)).sum().backward()
    reference = probs.detach().clone().requires_grad_()
    want = reference.T.masked_select(routing_map.T)
    (want * torch.arange(want.shape[0], device=DEVICE)).sum().backward()
    assert torch.equal(permuted_probs.detach(), want.detach())
    assert torch.equal(probs.grad, reference.grad)


def test_permutation_matches_megatron_permute():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    scores, routing_map = _routing(100, 8, 2)
    probs = scores * routing_map
    hidden = torch.randn(100, 16, device=DEVICE)
    permuted, permuted_probs, sorted_indices, _, _ = moe_utils.permute(
        hidden, routing_map, probs=probs, num_out_tokens=int(routing_map.sum())
    )
    ours, our_probs, _ = kernels.permutation_indices(routing_map, probs)
    assert torch.equal(ours, sorted_indices)
    assert torch.equal(our_probs, permuted_probs)
    assert torch.equal(hidden[ours], permuted)


def test_kernel_input_errors():
    scores, routing_map = _routing(4, 600, 2)
    with pytest.raises(ValueError, match="up to 512 experts"):
        kernels.collect_candidates(scores, routing_map, routing_map, None, "score")
    scores, routing_map = _routing(4, 8, 2)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        kernels.collect_candidates(scores.double(), routing_map, routing_map, None, "score")
    with pytest.raises(TypeError, match="candidates must be torch.bool"):
        kernels.collect_candidates(scores, routing_map.int(), routing_map, None, "score")
    with pytest.raises(ValueError, match="must all be"):
        kernels.collect_candidates(scores, routing_map, routing_map, scores[:2], "score")
    with pytest.raises(ValueError, match="priority must be one of"):
        kernels.collect_candidates(scores, routing_map, routing_map, None, "probs")
    lists = kernels.collect_candidates(scores, routing_map, routing_map, None, "score")[0]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        kernels.bin_thresholds(lists, torch.arange(8, device=DEVICE).view(8, 1), 0)


def test_auto_backend_picks_triton_on_cuda_up_to_512_experts(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert planner._ops_for("auto", torch.zeros(4, 512)) is kernels
    assert planner._ops_for("auto", torch.zeros(4, 513)) is ops  # beyond the kernels' limit
    assert planner._ops_for("torch", torch.zeros(4, 8)) is ops
    monkeypatch.undo()
    assert planner._ops_for("auto", torch.zeros(4, 8)) is ops  # CPU tensors


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scores, routing_map = skewed_routing(8, 4, 2)  # CPU tensors, whatever the machine
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        plan_routing(scores, routing_map, CapacityConfig(1.0, backend="triton"))


@pytest.mark.parametrize("num_tokens,num_experts,topk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_bin", [1, "all"])
def test_drop_below_bit_exact(num_tokens, num_experts, topk, dtype, per_bin):
    scores, routing_map = _routing(num_tokens, num_experts, topk, skew=2.0, dtype=dtype)
    candidates = _with_local_candidates(routing_map)
    probs = (scores * routing_map * 1.7).to(dtype)
    per_bin = num_experts if per_bin == "all" else per_bin
    expert_to_bin = torch.arange(num_experts, device=DEVICE) // per_bin
    bin_experts = torch.argsort(expert_to_bin, stable=True).view(-1, per_bin)
    capacity = max(1, num_tokens * topk // num_experts)
    args = (scores, candidates, routing_map, probs, "score", 0, 5)
    lists, keep, weights = kernels.collect_candidates(*args)
    keys, want_keep, want_weights = ops.collect_candidates(*args)
    thresholds = ops.bin_thresholds(keys, bin_experts, capacity)
    got = kernels.drop_below(lists, thresholds, expert_to_bin, keep, weights)
    want = ops.drop_below(keys, thresholds, expert_to_bin, want_keep, want_weights)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_old_triton_is_refused_with_a_clear_error(monkeypatch):
    import importlib

    import triton

    monkeypatch.setattr(triton, "__version__", "3.4.0")
    with pytest.raises(ImportError, match=r"triton >= 3\.5, found 3\.4\.0"):
        importlib.reload(kernels)
    monkeypatch.undo()
    importlib.reload(kernels)
    assert kernels._version_tuple("3.10.0+git1234") == (3, 10)
