"""The capaware dispatcher inside Megatron-Core's MoELayer, over gloo in several layouts.

Peers: the stock all-to-all dispatcher (dropless must be identical, outputs and gradients),
Megatron-Core's own capacity drop (moe_expert_capacity_factor + moe_token_drop_policy="probs"
must equal scope local, policy drop), the single-process planner on the gathered batch
(scope global), and the torch planner for the Triton backend (interpreter on CPU).
"""

import importlib.util
from dataclasses import replace

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from megatron_harness import Layout

from capaware_megatron import CapacityConfig, plan_routing

pytest.importorskip("megatron.core")

LAYOUTS = {
    "EP2": Layout(ep=2, world_size=2),
    "EP4": Layout(ep=4, world_size=4),
    "TP2xEP2": Layout(tp=2, ep=2, world_size=4),
    "ETP2xEP2": Layout(ep=2, etp=2, world_size=4),
}


def _tokens(rank: int) -> int:
    """Sequence lengths differ across ranks."""
    return 10 + 3 * rank


def _assert_same(a, b, what):
    out_a, grad_a, params_a = a
    out_b, grad_b, params_b = b
    torch.testing.assert_close(out_a, out_b, msg=f"{what}: outputs")
    torch.testing.assert_close(grad_a, grad_b, msg=f"{what}: input gradients")
    assert params_a.keys() == params_b.keys(), what
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], msg=f"{what}: grad of {name}")


def _identity_round_trip(layer, x):
    """Dispatch and combine through the capaware dispatcher with identity experts."""
    dispatcher = layer.token_dispatcher
    x = x.detach().clone().requires_grad_(True)
    hidden = x.view(-1, x.shape[-1])
    probs, routing_map = layer.router(hidden)
    layer.eval()  # the dispatcher takes its mode from the layer
    permuted, permuted_probs = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    received, received_probs = dispatcher.token_dispatch(permuted, permuted_probs)
    received, tokens_per_expert, _ = dispatcher.dispatch_postprocess(received, received_probs)
    back = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(received)))
    weight = torch.linspace(0.5, 1.5, back.numel()).view_as(back)
    (back * weight).sum().backward()
    # Each expert-TP rank returns the whole input and the combine sums the shards: x etp.
    kept = dispatcher.last_plan.routing_map.sum(1, keepdim=True).float() * dispatcher.tp_size
    return back.detach(), x.grad, hidden.detach(), kept, weight


def _dispatcher_checks(rank, world_size, layout):
    from megatron.core import parallel_state

    import megatron_harness as mh

    mh.setup(layout)
    x = mh.local_input(_tokens(rank), seed=100 + rank)
    results = {}

    stock = mh.forward_backward(mh.moe_layer(layout, "alltoall"), x)
    for name, cfg in [("gamma None", CapacityConfig(None)), ("policy none", CapacityConfig(policy="none"))]:
        results[f"dropless: {name}"] = (stock, mh.forward_backward(mh.moe_layer(layout, "capaware", cfg), x))

    megatron_drop = mh.moe_layer(
        layout, "alltoall", moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"
    )
    ours = mh.moe_layer(layout, "capaware", CapacityConfig(1.0, apply_in_training=True))
    results["local drop vs Megatron, train"] = (
        mh.forward_backward(megatron_drop, x), mh.forward_backward(ours, x)
    )
    with torch.no_grad():
        megatron_drop.eval(), ours.eval()
        results["local drop vs Megatron, eval"] = (megatron_drop(x)[0], ours(x)[0])
    # Not applied in training unless asked: training mode is the stock dispatcher.
    results["training is dropless"] = (
        stock, mh.forward_backward(mh.moe_layer(layout, "capaware", CapacityConfig(1.0)), x)
    )
    if importlib.util.find_spec("triton") is not None:
        # The Triton planner inside the layer, with gradients (router included).
        for policy in ("drop", "reroute"):
            cfg = CapacityConfig(1.0, policy=policy, apply_in_training=True, backend="torch")
            results[f"{policy}: Triton backend vs torch, train"] = tuple(
                mh.forward_backward(mh.moe_layer(layout, "capaware", replace(cfg, backend=backend)), x)
                for backend in ("torch", "triton")
            )
    # Decode-sized step: 2 tokens x top-2 over 8 experts is below min_capacity 1.
    tiny = mh.local_input(2, seed=300 + rank)
    results["decode guard"] = (
        mh.forward_backward(mh.moe_layer(layout, "alltoall"), tiny, training=False),
        mh.forward_backward(mh.moe_layer(layout, "capaware", CapacityConfig(1.0, min_capacity=1)), tiny, training=False),
    )

    plans = {}
    for policy in ("drop", "reroute", "expanded"):
        for scope in ("local", "global", "device"):
            layer = mh.moe_layer(layout, "capaware", CapacityConfig(1.0, policy=policy, scope=scope))
            records = mh.record_plans(layer)
            layer.eval()
            with torch.no_grad():
                out, _ = layer(x)
            assert torch.isfinite(out).all()
            plans[(policy, scope)] = records[-1]

    layer = mh.moe_layer(layout, "capaware", CapacityConfig(0.75, policy="reroute", scope="global"))
    round_trip = _identity_round_trip(layer, x)
    group = layer.token_dispatcher.tp_ep_group
    return dict(
        results=results, plans=plans, round_trip=round_trip,
        tp_ep_rank=torch.distributed.get_rank(group),
        tp_ep_ranks=tuple(torch.distributed.get_process_group_ranks(group)),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        local_experts=layer.local_expert_indices,
    )


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_run(request):
    layout = LAYOUTS[request.param]
    return request.param, layout, run_gloo(_dispatcher_checks, layout.world_size, layout)


def test_equivalences(layout_run):
    name, _, per_rank = layout_run
    for rank, result in enumerate(per_rank):
        for what, (a, b) in result["results"].items():
            if isinstance(a, tuple):
                _assert_same(a, b, f"{name} rank {rank} {what}")
            else:
                torch.testing.assert_close(a, b, msg=f"{name} rank {rank} {what}")


def test_capacity_and_global_plan(layout_run):
    name, layout, all_ranks = layout_run
    # Global scope spans the group the all-to-all spans (expert-TP x EP); check each one.
    for group in sorted({r["tp_ep_ranks"] for r in all_ranks}):
        per_rank = [all_ranks[r] for r in group]
        _check_group_plans(f"{name} group {group}", layout, per_rank)


def _gathered_plan(records, local_experts, cfg):
    """The single-process plan of the ranks' recorded [scores, routing_map, probs, plan] batches,
    in that order, each token's own rank's experts (local_experts, per rank) for expanded."""
    local = torch.cat([
        torch.zeros_like(rec[1]).index_fill_(1, torch.tensor(experts), True)
        for experts, rec in zip(local_experts, records)
    ])
    return plan_routing(torch.cat([rec[0] for rec in records]), torch.cat([rec[1] for rec in records]),
                        cfg, probs=torch.cat([rec[2] for rec in records]), local_experts=local)


def _check_group_plans(name, layout, per_rank):
    order = sorted(range(len(per_rank)), key=lambda r: per_rank[r]["tp_ep_rank"])
    for (policy, scope), _ in per_rank[0]["plans"].items():
        records = [per_rank[r]["plans"][(policy, scope)] for r in order]
        plans = [rec[3] for rec in records]
        loads = torch.stack([p.tokens_per_expert_after for p in plans])
        capacity = plans[0].capacity
        if scope == "global":
            # The cap holds for what each expert receives from all ranks together ...
            assert int(loads.sum(0).max()) <= capacity, (name, policy)
            # ... and the plan is the single-process plan of the gathered batch.
            whole = _gathered_plan(records, [per_rank[r]["local_experts"] for r in order],
                                   CapacityConfig(1.0, policy=policy))
            assert torch.equal(torch.cat([p.routing_map for p in plans]), whole.routing_map), (name, policy)
            torch.testing.assert_close(torch.cat([p.probs for p in plans]), whole.probs)
        else:  # each rank caps its own tokens, with its own T
            caps = torch.tensor([p.capacity for p in plans]).unsqueeze(1)
            if scope == "device":
                loads = loads.view(loads.shape[0], layout.ep, -1).sum(2)
            assert bool((loads <= caps).all()), (name, policy, scope)
        if policy != "expanded":
            assert any(int(p.num_dropped) + int(p.num_rerouted) > 0 for p in plans), "no overflow tested"


def test_identity_round_trip(layout_run):
    name, _, per_rank = layout_run
    for rank, result in enumerate(per_rank):
        back, grad, hidden, kept, weight = result["round_trip"]
        torch.testing.assert_close(back, hidden * kept, msg=f"{name} rank {rank}")
        torch.testing.assert_close(grad.view(-1, grad.shape[-1]), weight * kept, msg=f"{name} rank {rank}")


def _pipeline_checks(rank, world_size, layout):
    import megatron_harness as mh

    mh.setup(layout)
    stock = mh.pipeline_step(mh.gpt_model(layout, "alltoall"))
    dropless = mh.pipeline_step(mh.gpt_model(layout, "capaware", CapacityConfig(None)))
    megatron_drop = mh.pipeline_step(
        mh.gpt_model(layout, "alltoall", moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")
    )
    ours_drop = mh.pipeline_step(
        mh.gpt_model(layout, "capaware", CapacityConfig(1.0, apply_in_training=True))
    )
    model = mh.gpt_model(layout, "capaware", CapacityConfig(1.0, policy="reroute"))
    eval_loss, _ = mh.pipeline_step(model, forward_only=True)
    plans = [layer.mlp.token_dispatcher.last_plan for layer in model.decoder.layers]
    return dict(stock=stock, dropless=dropless, megatron_drop=megatron_drop, ours_drop=ours_drop,
                eval_loss=eval_loss, plans=plans)


def test_pipeline_parallel_pp2_ep2():
    layout = Layout(pp=2, ep=2, world_size=4)
    per_rank = run_gloo(_pipeline_checks, layout.world_size, layout)
    for rank, result in enumerate(per_rank):
        for a, b in [("stock", "dropless"), ("megatron_drop", "ours_drop")]:
            loss_a, grads_a = result[a]
            loss_b, grads_b = result[b]
            if loss_a is not None:
                torch.testing.assert_close(loss_a, loss_b)
            assert grads_a.keys() == grads_b.keys() and grads_a
            for name in grads_a:
                torch.testing.assert_close(grads_a[name], grads_b[name], msg=f"rank {rank} {a}/{b} {name}")
        # Each stage plans its own two layers, in eval mode, within capacity.
        assert len(result["plans"]) == 2
        for plan in result["plans"]:
            assert int(plan.tokens_per_expert_after.max()) <= plan.capacity
            assert int(plan.num_rerouted) > 0
    assert per_rank[-1]["eval_loss"] is not None and torch.isfinite(per_rank[-1]["eval_loss"])


NO_SP_LAYOUTS = {"TP2xEP2": Layout(tp=2, ep=2, world_size=4),
                 "TP2xETP2xEP2": Layout(tp=2, ep=2, etp=2, world_size=4)}
NO_SP_CONFIGS = {"drop g0.6": CapacityConfig(0.6, scope="global"),
                 "reroute g0.75": CapacityConfig(0.75, policy="reroute", scope="global")}


def _global_plans_without_sp(rank, world_size, layout):
    """Eval without sequence parallelism (the usual inference layout): attention-TP peers hold
    the same tokens."""
    from megatron.core import parallel_state

    import megatron_harness as mh

    mh.setup(layout)
    x = mh.local_input(12 + 3 * parallel_state.get_data_parallel_rank(), requires_grad=False,
                       seed=200 + parallel_state.get_data_parallel_rank())
    results = {}
    for name, cfg in NO_SP_CONFIGS.items():
        layer = mh.moe_layer(layout, "capaware", cfg, sequence_parallel=False).eval()
        records = mh.record_plans(layer)
        with torch.no_grad():
            out, _ = layer(x)
        results[name] = (out, records[-1])
    group = layer.token_dispatcher.tp_ep_group
    return dict(results=results, tp_ranks=tuple(torch.distributed.get_process_group_ranks(
                    parallel_state.get_tensor_model_parallel_group())),
                tp_ep_ranks=tuple(torch.distributed.get_process_group_ranks(group)),
                local_experts=layer.local_expert_indices)


@pytest.mark.parametrize("name", list(NO_SP_LAYOUTS))
def test_global_plan_counts_tensor_parallel_copies_once(name):
    layout = NO_SP_LAYOUTS[name]
    per_rank = run_gloo(_global_plans_without_sp, layout.world_size, layout)
    for config in NO_SP_CONFIGS:
        # TP peers hold the same tokens: they keep the same assignments, so their outputs agree.
        for rank, result in enumerate(per_rank):
            for peer in result["tp_ranks"]:
                torch.testing.assert_close(result["results"][config][0], per_rank[peer]["results"][config][0],
                                           msg=f"{name} {config}: rank {rank} vs its TP peer {peer}")
        # The plan is the single-process plan of the group's distinct tokens (one copy each).
        for group in sorted({r["tp_ep_ranks"] for r in per_rank}):
            sources = list(dict.fromkeys(min(per_rank[r]["tp_ranks"]) for r in group))
            firsts = [next(r for r in group if min(per_rank[r]["tp_ranks"]) == s) for s in sources]
            records = [per_rank[r]["results"][config][1] for r in firsts]
            cfg = NO_SP_CONFIGS[config]
            whole = _gathered_plan(records, [per_rank[r]["local_experts"] for r in firsts],
                                   CapacityConfig(cfg.capacity_factor, policy=cfg.policy))
            assert torch.equal(torch.cat([rec[3].routing_map for rec in records]), whole.routing_map), (name, config)
            for r in group:  # every copy plans like its set's first rank
                first = firsts[sources.index(min(per_rank[r]["tp_ranks"]))]
                assert torch.equal(per_rank[r]["results"][config][1][3].routing_map,
                                   per_rank[first]["results"][config][1][3].routing_map)
            assert int(whole.num_dropped) + int(whole.num_rerouted) > 0, (name, config, "the cap must bind")
