"""No host synchronization in the per-forward plan: every policy, priority and scope local /
device, torch and Triton backends (host code; kernels under the interpreter), and the plan steps
of the Megatron dispatcher and the DeepSpeed gate. The recorder fails on every op that would
copy device data to the host on a GPU (tests/host_sync.py); a planted one proves it watches."""

import importlib.util
import os

import pytest
import torch
from host_sync import HostSyncRecorder

from capaware_megatron import CapacityConfig, ExpertLayout, plan_routing
from capaware_megatron.multiprocess import run_gloo
from capaware_megatron.synthetic import skewed_routing

NUM_TOKENS, NUM_EXPERTS, TOPK = 256, 16, 2
LAYOUT = ExpertLayout.build(NUM_EXPERTS, torch.arange(NUM_EXPERTS) // 4, range(4))
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def _plan(cfg, **kwargs):
    scores, routing_map = skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK, skew=2.0)
    probs = scores * routing_map
    with HostSyncRecorder() as syncs:
        plan = plan_routing(scores, routing_map, cfg, probs=probs, topk=TOPK, validate=False, **kwargs)
    return plan, syncs.ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
@pytest.mark.parametrize("priority", ["score", "position", "reverse", "random"])
@pytest.mark.parametrize("scope", ["local", "device"])
def test_plan_has_no_host_sync(backend, policy, priority, scope):
    cfg = CapacityConfig(1.0, policy=policy, priority=priority, scope=scope, backend=backend)
    plan, syncs = _plan(cfg, layout=LAYOUT)
    assert syncs == []
    assert int(plan.num_dropped) + int(plan.num_rerouted) > 0, "the cap must bind"


def test_the_recorder_sees_host_syncs():
    """Without a layout the expert mapping is checked on the host per call; validate=True reads
    the scores: both are what the recorder must report (each names where it happened)."""
    cfg = CapacityConfig(1.0, scope="device")
    _, syncs = _plan(cfg, expert_to_rank=torch.arange(NUM_EXPERTS) // 4)
    assert syncs and all("layout.py" in where for _, where in syncs)
    scores, routing_map = skewed_routing(NUM_TOKENS, NUM_EXPERTS, TOPK)
    with HostSyncRecorder() as recorder:
        plan_routing(scores, routing_map, CapacityConfig(1.0), validate=True)
        scores[routing_map]  # boolean-mask indexing
        torch.nonzero(routing_map)
    ops = [op for op, _ in recorder.ops]
    assert "Tensor.__bool__" in ops and "aten.index with a boolean mask" in ops and "aten.nonzero" in ops


def _dispatcher_plan_syncs(rank, world_size, policy, scope):
    import megatron_harness as mh

    mh.setup(mh.Layout(ep=2, world_size=2))
    layer = mh.moe_layer(mh.Layout(ep=2, world_size=2), "capaware",
                         CapacityConfig(1.0, policy=policy, scope=scope)).eval()
    hidden = mh.local_input(64, seed=rank, requires_grad=False)
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
        dispatcher = layer.token_dispatcher
        dispatcher.training = False  # what the layer's forward pre-hook sets in eval
        with HostSyncRecorder() as syncs:
            plan = dispatcher.plan(routing_map, probs)
    return syncs.ops, int(plan.num_dropped) + int(plan.num_rerouted)


@pytest.mark.parametrize("policy,scope", [("drop", "local"), ("reroute", "device"), ("expanded", "local")])
def test_megatron_dispatcher_plan_step_has_no_host_sync(policy, scope):
    pytest.importorskip("megatron.core")
    results = run_gloo(_dispatcher_plan_syncs, 2, policy, scope)
    assert [syncs for syncs, _ in results] == [[], []]
    assert sum(moved for _, moved in results) > 0


@pytest.mark.parametrize("policy", ["drop", "reroute", "expanded"])
def test_deepspeed_gate_plan_step_has_no_host_sync(policy):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from capaware_megatron.deepspeed.gate import CapacityAwareGate

    gate = CapacityAwareGate(12, 8, 2, capacity_config=CapacityConfig(1.0, policy=policy), min_capacity=0).eval()
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(8, 12, generator=torch.Generator().manual_seed(1)) * 2)
        _, scores, routing_map = gate._router(torch.randn(64, 12, generator=torch.Generator().manual_seed(2)))
        gate._plan(scores, routing_map)  # the layout is built (and checked) at the first plan
        with HostSyncRecorder() as syncs:
            plan = gate._plan(scores, routing_map)
    assert syncs.ops == []
    assert int(plan.num_dropped) + int(plan.num_rerouted) > 0
