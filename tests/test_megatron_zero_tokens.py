"""A rank with no tokens under a cap (issue 26), the dispatcher driven as Megatron drives it.

Megatron-Core's dispatcher tests, its EP-overlap schedule and partial CUDA-graph capture call
the MoE layer's stages (preprocess, dispatch, experts, combine) or the dispatcher itself
without the layer's forward; the capaware dispatcher must still see the layer's eval mode. EP2
and EP4, one rank with zero tokens, the others with three: for every policy and scope,

- the round trip (permute, all-to-all, unpermute of the permuted hidden states times the
  permuted probs) returns each token's hidden state times the sum of its planned weights, and
- the layer's own stages with its experts return the dense single-process MoE of the tokens,
  sum over experts of weight x expert(x), with weights from the loop reference planner
  (tests/reference.py) over each rank's tokens (local, device) or the gathered batch (global).

Megatron's router cannot route zero tokens (its gating reshapes [0, E] with -1), so routing is
Megatron's own top-k function on the router's logits, handed to the dispatcher as the layer's
router tap does.
"""

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from megatron_harness import FFN, HIDDEN, TOPK, Layout, _distinct_weight
from reference import reference_plan

from capaware_megatron import CapacityConfig

pytest.importorskip("megatron.core")

GAMMA = 0.5
COUNTS = {2: [0, 3], 4: [3, 0, 3, 3]}  # tokens per rank: the empty rank first, then inside
CONFIGS = [CapacityConfig(GAMMA, policy=policy, scope=scope)
           for policy in ("drop", "reroute", "expanded") for scope in ("local", "device", "global")]


def _route(layer, hidden):
    """(logits, probs, routing_map) with Megatron's own top-k on the router's logits."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = hidden @ layer.router.weight.t()
    probs, routing_map = topk_routing_with_score_function(logits, TOPK, score_function="softmax")
    return logits, probs, routing_map


def _zero_token_worker(rank, world_size, counts):
    import megatron_harness as mh

    layout = Layout(ep=world_size, world_size=world_size)
    mh.setup(layout)
    # Tokens that lean one way (a shared direction), so that the hot experts overflow.
    common = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9))
    own = mh.local_input(counts[rank], seed=100 + rank, requires_grad=False).view(-1, HIDDEN)
    hidden = common + 0.5 * own
    results = []
    for cfg in CONFIGS:
        layer = mh.moe_layer(layout, "capaware", cfg).eval()
        dispatcher = layer.token_dispatcher
        with torch.no_grad():
            logits, probs, routing_map = _route(layer, hidden)
            # The round trip, through the dispatcher alone (Megatron's dispatcher tests).
            dispatcher.capture_router_logits(logits)
            round_trip = mh.weighted_round_trip(dispatcher, hidden, routing_map, probs)
            # The layer's own stages with its experts (the EP-overlap schedule's callables).
            dispatcher.capture_router_logits(logits)
            tokens, weights = layer.preprocess(hidden, probs, routing_map)
            tokens, weights = layer.dispatch(tokens, weights)
            output, _ = layer.routed_experts_compute(tokens, weights)
            output = layer.postprocess(layer.combine(output), None)
        results.append(dict(round_trip=round_trip, output=output))
    return dict(hidden=hidden, logits=logits, probs=probs, routing_map=routing_map,
                local_experts=list(layer.local_expert_indices), results=results)


def _dense_moe(hidden, weights):
    """[T, H]: sum over experts of weight x expert(hidden), the harness's distinct experts."""
    out = torch.zeros_like(hidden)
    for expert in range(weights.shape[1]):
        fc1 = _distinct_weight(expert, (FFN, HIDDEN), salt=1)
        fc2 = _distinct_weight(expert, (HIDDEN, FFN), salt=2)
        out += weights[:, expert : expert + 1] * (torch.nn.functional.gelu(hidden @ fc1.t()) @ fc2.t())
    return out


def _reference_weights(per_rank, cfg, num_experts, world_size):
    """[sum T, E] the planned weights of every rank's tokens, in rank order."""
    # Megatron's softmax top-k weighs a pick exp(l) / sum over the picks of exp(l); an expert the
    # router did not pick is ranked as it would have weighed it, the same expression.
    scores = [torch.where(r["routing_map"], r["probs"], torch.exp(r["logits"] - torch.logsumexp(
        r["logits"].masked_fill(~r["routing_map"], float("-inf")), -1, keepdim=True))) for r in per_rank]
    owner = torch.cat([torch.full((r["hidden"].shape[0],), rank) for rank, r in enumerate(per_rank)])
    expert_to_rank = torch.arange(num_experts) // (num_experts // world_size)
    local = expert_to_rank.unsqueeze(0) == owner.unsqueeze(1)  # [T, E]: each token's own rank
    if cfg.scope == "global":
        return reference_plan(torch.cat(scores), torch.cat([r["routing_map"] for r in per_rank]), cfg,
                              local_experts=local, probs=torch.cat([r["probs"] for r in per_rank]))[1]
    return torch.cat([
        reference_plan(score, r["routing_map"], cfg, local_experts=r["local_experts"],
                       expert_to_rank=expert_to_rank, probs=r["probs"])[1]
        for score, r in zip(scores, per_rank)
    ])


@pytest.mark.parametrize("world_size", sorted(COUNTS))
def test_zero_token_rank_round_trip_and_outputs(world_size):
    counts = COUNTS[world_size]
    per_rank = run_gloo(_zero_token_worker, world_size, counts)
    num_experts = per_rank[0]["logits"].shape[1]
    hidden = torch.cat([r["hidden"] for r in per_rank])
    bounds = torch.tensor([0, *counts]).cumsum(0)
    for index, cfg in enumerate(CONFIGS):
        weights = _reference_weights(per_rank, cfg, num_experts, world_size)
        router_weights = torch.cat([r["probs"] for r in per_rank])
        assert not torch.equal(weights, router_weights), (cfg, "the cap must bind")
        expected_trip = hidden * weights.sum(1, keepdim=True)
        expected_output = _dense_moe(hidden, weights)
        for rank, result in enumerate(per_rank):
            mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
            what = f"EP{world_size} rank {rank} ({counts[rank]} tokens) {cfg.policy}/{cfg.scope}"
            got = result["results"][index]
            torch.testing.assert_close(got["round_trip"], expected_trip[mine], msg=f"{what}: round trip")
            torch.testing.assert_close(got["output"], expected_output[mine], msg=f"{what}: MoE output")
