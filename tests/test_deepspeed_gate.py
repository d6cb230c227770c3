"""The capacity-aware gate in DeepSpeed-MoE over gloo: 1, 2 and 4 processes, ep 1/2/4, k 1/2/4.

Peers: DeepSpeed's own dropless MoE (policy none / gamma None must match it) and a dense
single-process computation of the layer with the loop reference planner's weights.
"""

import importlib.util
import os

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from reference import reference_plan

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from capaware_megatron import CapacityConfig  # noqa: E402

ENV = {"DS_ACCELERATOR": "cpu"}
CONFIGS = {
    "drop": CapacityConfig(1.0),
    "drop-position": CapacityConfig(0.75, priority="position"),
    "reroute": CapacityConfig(1.0, policy="reroute"),
    "expanded": CapacityConfig(1.0, policy="expanded"),
}


def _tokens(rank):
    return 16 + 5 * rank  # token counts differ across ranks: capacity must still agree


def _ds_config(cfg: CapacityConfig):
    return {"train_batch_size": 1, "capacity_aware": {
        k: v for k, v in cfg.__dict__.items() if k != "backend"}}


def _gate_checks(rank, world_size, ep_size):
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed import apply

    dh.setup()
    x = dh.local_tokens(rank, _tokens(rank))
    out = {}
    for k in (1, 2, 4):
        stock = dh.moe_layer(ep_size, k, drop_tokens=False).eval()
        ours = dh.moe_layer(ep_size, k).eval()
        apply(ours, _ds_config(CapacityConfig(None)))
        with torch.no_grad():
            out[("dropless", k)] = (stock(x)[0], ours(x)[0])
        for name, cfg in CONFIGS.items():
            layer = dh.moe_layer(ep_size, k).eval()
            (gate,) = apply(layer, _ds_config(cfg))
            with torch.no_grad():
                y = layer(x)[0]
            out[(name, k)] = (y, gate.last_plan)
        # Training: forward and backward through the all-to-all with the cap applied.
        layer = dh.moe_layer(ep_size, k).train()
        apply(layer, _ds_config(CapacityConfig(1.0, apply_in_training=True)))
        xg = x.clone().requires_grad_(True)
        y, l_aux, _ = layer(xg)
        (y.square().mean() + l_aux).backward()
        grads = [p.grad for p in layer.parameters()]
        out[("train", k)] = (xg.grad, all(g is not None and torch.isfinite(g).all() for g in grads))
    if importlib.util.find_spec("triton") is not None:
        # The Triton planner (interpreter on CPU) trains exactly like the torch one.
        for backend in ("torch", "triton"):
            layer = dh.moe_layer(ep_size, 2).train()
            apply(layer, {"capacity_aware": {"capacity_factor": 1.0, "policy": "reroute",
                                             "apply_in_training": True, "backend": backend}})
            xg = x.clone().requires_grad_(True)
            y, l_aux, _ = layer(xg)
            (y.square().mean() + l_aux).backward()
            out[("backend", backend)] = [y, xg.grad, *(p.grad for p in layer.parameters())]
    import torch.distributed as dist

    ep_rank = dist.get_rank(layer.deepspeed_moe.ep_group)
    return dict(out=out, x=x, ep_rank=ep_rank)


@pytest.mark.parametrize("world_size,ep_size", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_gate_against_deepspeed_and_reference(world_size, ep_size):
    import deepspeed_harness as dh

    per_rank = run_gloo(_gate_checks, world_size, ep_size, env=ENV)
    moved = sum(int(r["out"][("drop", 2)][1].num_dropped) + int(r["out"][("reroute", 2)][1].num_rerouted) for r in per_rank)
    assert moved > 0, "no overflow: the capacity paths were not exercised"
    for rank, result in enumerate(per_rank):
        x = result["x"]
        ep_rank = result["ep_rank"]
        per_ep = dh.EXPERTS // ep_size
        for k in (1, 2, 4):
            stock, ours = result["out"][("dropless", k)]
            torch.testing.assert_close(ours, stock, msg=f"rank {rank} k={k} dropless")
            scores, routing_map, combine = dh.router(x, k)
            for name, cfg in CONFIGS.items():
                y, plan = result["out"][(name, k)]
                local = range(ep_rank * per_ep, (ep_rank + 1) * per_ep)
                ref_map, ref_probs, ref_cap = reference_plan(scores, routing_map, cfg, list(local), probs=combine)
                assert torch.equal(plan.routing_map, ref_map), (rank, k, name)
                assert int(plan.tokens_per_expert_after.max()) <= plan.capacity == ref_cap
                torch.testing.assert_close(y, dh.dense_moe(x, ref_probs), msg=f"rank {rank} k={k} {name}")
            grad, finite = result["out"][("train", k)]
            assert finite and torch.isfinite(grad).all()
        if ("backend", "triton") in result["out"]:
            want_all, got_all = result["out"][("backend", "torch")], result["out"][("backend", "triton")]
            assert len(want_all) == len(got_all)
            for want, got in zip(want_all, got_all):
                torch.testing.assert_close(got, want, msg=f"rank {rank}: Triton backend vs torch")


def _dense_and_monitor(rank, world_size, tmp):
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed import apply, tracker_from_ds_config

    dh.setup()
    layer = dh.moe_layer(world_size, 2).eval()
    config = {"capacity_aware": {"capacity_factor": 1.0, "policy": "reroute",
                                 "log": {"interval": 1, "wandb": False, "tensorboard": False,
                                         "jsonl": f"{tmp}/rank{rank}.jsonl"}}}
    (gate,) = apply(layer, config)
    tracker = tracker_from_ds_config(layer, config)
    x = dh.local_tokens(rank, 20).reshape(-1, dh.HIDDEN)
    with torch.no_grad():
        l_aux, capacity, num_experts, indices, locations, gates, counts = gate(x, sparse_routes=True)
        l_aux_dense, combine, dispatch, counts_dense = gate(x, sparse_routes=False)
        layer(x.unsqueeze(0))
    metrics = tracker.step()
    # The dense form holds the same (token, expert, slot, weight) entries as the sparse routes.
    sparse = torch.zeros_like(combine)
    for route in range(indices.shape[0]):
        kept = indices[route] >= 0
        tokens = torch.arange(x.shape[0])[kept]
        sparse[tokens, indices[route][kept].long(), locations[route][kept].long()] = gates[route][kept]
    return (torch.equal(sparse, combine), torch.equal(dispatch, combine.bool()), float(l_aux) == float(l_aux_dense),
            int(capacity) == combine.shape[2], metrics)


def test_dense_form_and_monitor_from_the_config(tmp_path):
    results = run_gloo(_dense_and_monitor, 2, str(tmp_path), env=ENV)
    for same, mask, aux, cap, _ in results:
        assert same and mask and aux and cap
    metrics = results[0][4]
    assert metrics["capaware/layer_0/capacity"] > 0 and "capaware/rerouted_fraction" in metrics
    assert (tmp_path / "rank0.jsonl").exists() and not (tmp_path / "rank1.jsonl").exists()
