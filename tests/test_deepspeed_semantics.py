"""The DeepSpeed gate against DeepSpeed's own gating functions, in one process: combine weights,
capacities, used_token, the differences that are kept on purpose, apply()'s all-or-nothing swap,
the legacy inference layer, and the config section's errors."""

import importlib
import json
import os
import warnings

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from deepspeed.moe import sharded_moe  # noqa: E402
from deepspeed.moe.layer import MoE  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.config import expert_capacity  # noqa: E402
from capaware_megatron.deepspeed import apply, parse_section  # noqa: E402
from capaware_megatron.deepspeed.gate import CapacityAwareGate, deepspeed_capacity  # noqa: E402

HIDDEN, EXPERTS = 12, 8


def _gate_weight(num_experts=EXPERTS):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(num_experts, HIDDEN, generator=gen)
    weight[:2] += 1.5 * torch.randn(HIDDEN, generator=gen)  # hot experts: the cap binds
    return weight


def _tokens(num_tokens, seed=3):
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _our_gate(k, cfg, num_experts=EXPERTS):
    gate = CapacityAwareGate(HIDDEN, num_experts, k, capacity_config=cfg, min_capacity=0)
    with torch.no_grad():
        gate.wg.weight.copy_(_gate_weight(num_experts))
    return gate.eval()


def _ds_logits(x, num_experts=EXPERTS):
    return torch.nn.functional.linear(x.float(), _gate_weight(num_experts))


def _weights(combine):
    """[S, E, C] -> [S, E]: the weight of every (token, expert)."""
    return combine.sum(-1)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
def test_renormalize_gives_deepspeeds_topk_gating(k, gamma):
    """renormalize=True: weights, slots, capacity, counts and l_aux equal DeepSpeed's probs drop."""
    x = _tokens(40)
    with torch.no_grad():
        l_aux, combine, dispatch, counts = _our_gate(k, CapacityConfig(gamma, renormalize=True))(x)
    ds_aux, ds_combine, ds_dispatch, ds_counts = sharded_moe.topkgating(
        _ds_logits(x), k, gamma, 0, drop_tokens=True, drop_policy="probs")
    assert int((_weights(ds_combine) > 0).sum()) < 40 * k, "the cap must bind"
    slots = combine.shape[2]
    assert slots <= ds_combine.shape[2]  # our buffer: the largest planned load, DeepSpeed's: C
    torch.testing.assert_close(combine, ds_combine[:, :, :slots], rtol=1e-6, atol=1e-7)
    assert not ds_combine[:, :, slots:].any()
    assert torch.equal(dispatch, ds_dispatch[:, :, :slots])
    if k == 2:  # TopKGate runs top2gating at k=2: its first-choice l_aux (its drops go by position)
        ds_aux, *_, ds_counts = sharded_moe.top2gating(_ds_logits(x), gamma, 0, top2_2nd_expert_sampling=False)
    assert torch.equal(counts, ds_counts) and float(l_aux) == pytest.approx(float(ds_aux), rel=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_default_weights_keep_the_pre_cap_weight(k):
    """renormalize=False (the default): a kept route keeps its top-k-normalised weight."""
    x = _tokens(40)
    _, combine, _, _ = _our_gate(k, CapacityConfig(1.0))(x)
    _, ds_combine, _, _ = sharded_moe.topkgating(_ds_logits(x), k, 1.0, 0, drop_policy="probs")
    ours, theirs = _weights(combine), _weights(ds_combine)
    assert torch.equal(ours > 0, theirs > 0)  # the same routes survive
    scores = torch.softmax(_ds_logits(x), dim=1)
    top = torch.zeros_like(scores).scatter(1, torch.topk(scores, k, dim=1).indices, 1.0)
    pre_cap = scores * top / (scores * top).sum(1, keepdim=True)
    torch.testing.assert_close(ours, pre_cap * (ours > 0))
    lost_a_route = (ours > 0).sum(1) < k
    assert lost_a_route.any() and (ours.sum(1)[lost_a_route] < 1 - 1e-4).all()
    assert not torch.allclose(ours[lost_a_route], theirs[lost_a_route])


def test_capacity_formula_is_deepspeeds():
    """DeepSpeed's float32 ceil(fp32(T/E) * fp32(gamma*k)), including where float64 rounds lower,
    from host ints and from 0-dim tensors alike."""
    differ = 0
    for num_tokens in range(1, 65, 3):
        for num_experts in (1, 3, 8, 16):
            for k in range(1, min(4, num_experts) + 1):
                for gamma in (0.5, 1.0, 1.1, 1.2, 1.25, 1.5, 2.0, 3.3):
                    gates = torch.empty(num_tokens, num_experts)
                    want = int(sharded_moe._capacity(gates, torch.tensor(gamma * k), torch.tensor(2)))
                    assert deepspeed_capacity(num_tokens, k, num_experts, gamma, 2) == want
                    # The same formula on counts kept on the device (global scope, eager).
                    on_device = deepspeed_capacity(torch.tensor(num_tokens), torch.tensor(k), num_experts, gamma, 2)
                    assert on_device.dtype == torch.int64 and int(on_device) == want
                    differ += expert_capacity(num_tokens, k, num_experts, gamma, 2) != want
    assert differ > 0, "the grid must hold points where the two formulas round apart"
    assert expert_capacity(25, 4, 8, 1.2) == 15
    assert deepspeed_capacity(25, 4, 8, 1.2) == 16  # Megatron-Core's float64 formula gives 15
    x = _tokens(25)
    gate = _our_gate(4, CapacityConfig(1.2))
    gate(x)
    assert gate.last_plan.capacity == 16


def test_used_token_counts_and_aux_loss_are_deepspeeds():
    """k=1 with masked tokens: exp_counts and l_aux as DeepSpeed's top1gating computes them."""
    x = _tokens(8, seed=11)
    used = torch.ones(8, dtype=torch.int64)  # DeepSpeed one-hots locations: an integer mask
    used[[1, 5]] = 0
    with torch.no_grad():
        l_aux, _, dispatch, counts = _our_gate(1, CapacityConfig(None))(x, used)
    ds_aux, _, _, ds_counts = sharded_moe.top1gating(
        _ds_logits(x), 8.0, 0, used_token=used, use_rts=False)  # gamma 8: nothing dropped
    assert torch.equal(counts, ds_counts.to(counts.dtype))
    assert float(l_aux) == pytest.approx(float(ds_aux), rel=1e-6)
    assert not dispatch[[1, 5]].any()  # masked tokens route nowhere


def test_kept_differences_from_deepspeed():
    """Pinned on purpose (README): min_capacity is a decode guard, training is uncapped by default."""
    x = _tokens(6)
    # 6 tokens * 2 / 8 experts < min_capacity 4: nothing is capped (DeepSpeed: C = 4, a floor).
    gate = _our_gate(2, CapacityConfig(0.5, min_capacity=4))
    _, combine, _, _ = gate(x)
    assert int(gate.last_plan.num_dropped) == 0 and int((_weights(combine) > 0).sum()) == 12
    # With enough tokens the floor applies: C = max(ceil(40*2/8*0.25), 4) = 4.
    gate = _our_gate(2, CapacityConfig(0.25, min_capacity=4))
    gate(_tokens(40))
    assert gate.last_plan.capacity == 4 and int(gate.last_plan.num_dropped) > 0
    # Training: no cap unless apply_in_training (DeepSpeed caps with capacity_factor).
    train = _our_gate(2, CapacityConfig(0.5)).train()
    train(_tokens(40))
    assert int(train.last_plan.num_dropped) == 0
    capped = _our_gate(2, CapacityConfig(0.5, apply_in_training=True)).train()
    capped(_tokens(40))
    assert int(capped.last_plan.num_dropped) > 0


def _moe(num_experts, k, **kwargs):
    return MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=num_experts, k=k, **kwargs)


def test_apply_stays_a_function_and_reconfigures():
    module = importlib.import_module("capaware_megatron.deepspeed")
    importlib.import_module("capaware_megatron.deepspeed.swap")
    m = _moe(2, 1)
    (first,) = module.apply(m, {"capacity_aware": {"capacity_factor": 1.0}})
    (again,) = module.apply(m, {"capacity_aware": {"capacity_factor": 2.0, "policy": "reroute"}})
    from capaware_megatron.deepspeed import apply as imported

    assert callable(module.apply) and imported is module.apply
    assert again is first and first.capacity_config == CapacityConfig(2.0, policy="reroute")


def test_failing_apply_changes_nothing_and_names_the_layer():
    model = torch.nn.Sequential(_moe(4, 1), _moe(2, 4))
    before = [layer.deepspeed_moe.gate for layer in model]
    with pytest.raises(ValueError, match=r"layer '1'.*k must be in \[1, num_experts=2\], got 4"):
        apply(model, {"capacity_aware": {"capacity_factor": 1.0}})
    assert [layer.deepspeed_moe.gate for layer in model] == before
    assert not any(isinstance(g, CapacityAwareGate) for g in before)
    with pytest.raises(ValueError, match="policy='reroute' needs a capacity_factor"):
        apply(_moe(4, 1), {"capacity_aware": {"policy": "reroute"}})


def test_ignored_deepspeed_settings_warn():
    with pytest.warns(UserWarning, match=r"no longer act.*0\.min_capacity=0.*0\.use_rts=False"):
        apply(torch.nn.Sequential(_moe(4, 1, min_capacity=0, use_rts=False)), {"capacity_aware": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply(_moe(4, 1), {"capacity_aware": {}})  # DeepSpeed's defaults: nothing to say


def _inference_layer(num_experts=4):
    """DeepSpeedMoEInference as init_inference builds it, minus its CUDA inference ops (which do
    not build on CPU): the config, the TopKGate (k=1, position drop) and the expert count."""
    from deepspeed.ops.transformer.inference.moe_inference import (
        DeepSpeedMoEInference,
        DeepSpeedMoEInferenceConfig,
    )

    config = DeepSpeedMoEInferenceConfig(hidden_size=HIDDEN, heads=2, moe_experts=num_experts,
                                         global_experts=num_experts, k=1, capacity_factor=1.0)
    layer = DeepSpeedMoEInference.__new__(DeepSpeedMoEInference)
    torch.nn.Module.__init__(layer)
    layer.config = config
    layer.moe_gate = sharded_moe.TopKGate(HIDDEN, num_experts, 1, config.capacity_factor,
                                          config.eval_capacity_factor, config.min_capacity,
                                          None, config.drop_tokens, config.use_rts)
    with torch.no_grad():
        layer.moe_gate.wg.weight.copy_(_gate_weight(num_experts))
    layer.ep_group = None
    return layer.eval()


def test_apply_reaches_the_legacy_inference_layer():
    layer = _inference_layer()
    router = layer.moe_gate.wg.weight
    (gate,) = apply(torch.nn.Sequential(layer), {"capacity_aware": {"capacity_factor": 1.0}})
    assert layer.moe_gate is gate and gate.wg.weight is router
    x = _tokens(32)
    # The layer's own data path: moe_gate_einsum's dispatch, expert_exec's reshape, and
    # scale_expert_output (DeepSpeed's code) combining per-expert outputs.
    _, combine, dispatch, _ = layer.moe_gate(x, None)
    dispatched = torch.einsum("sec,sm->ecm", dispatch.float(), x)
    experts = [torch.nn.Linear(HIDDEN, HIDDEN).eval() for _ in range(4)]
    expert_out = dispatched.reshape(1, 4, -1, HIDDEN)
    expert_out = torch.stack([experts[e](expert_out[0, e]) for e in range(4)])
    y = layer.scale_expert_output(x, expert_out, combine)
    weights = gate.last_plan.probs
    assert int(gate.last_plan.num_dropped) > 0
    dense = sum(weights[:, e : e + 1] * experts[e](x) for e in range(4))
    torch.testing.assert_close(y, dense)


@pytest.mark.parametrize(
    "log,match",
    [
        ({"interval": "10"}, r'"capacity_aware.log.interval" must be an integer, got str \'10\''),
        ({"per_expert": 1}, r'"capacity_aware.log.per_expert" must be true or false, got int 1'),
        ({"jsonl": 3}, r'"capacity_aware.log.jsonl" must be a string \(a path\) or null'),
    ],
)
def test_log_type_errors_say_what_is_wanted(log, match):
    with pytest.raises(TypeError, match=match):
        parse_section({"capacity_aware": {"log": log}})


def test_bad_json_file_is_named(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text('{"capacity_aware": {"capacity_factor": 1.0,}}')
    with pytest.raises(ValueError, match=r"ds_config\.json' is not valid JSON"):
        parse_section(str(path))
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(TypeError, match=r"ds_config\.json' must hold a JSON object"):
        parse_section(path)
