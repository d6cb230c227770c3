"""The capacity-aware gate under deepspeed.initialize (ZeRO 0 and 1, torch Adam), and the
"capacity_aware" config section's validation."""

import copy
import json
import os

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from capaware_megatron.deepspeed import parse_section  # noqa: E402

ENV = {"DS_ACCELERATOR": "cpu"}
EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "deepspeed_capacity_aware.json")


class _Net(torch.nn.Module):
    def __init__(self, ep_size, k):
        super().__init__()
        import deepspeed_harness as dh

        self.inp = torch.nn.Linear(dh.HIDDEN, dh.HIDDEN)
        self.moe = dh.moe_layer(ep_size, k, create_groups=False)
        self.out = torch.nn.Linear(dh.HIDDEN, 1)

    def forward(self, x):
        y, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        return self.out(y).mean() + 0.01 * l_aux


def _engine_run(rank, world_size, stage, apply_before, tmp):
    import deepspeed
    import deepspeed_harness as dh

    from capaware_megatron.deepspeed import CapacityAwareGate, apply, tracker_from_ds_config

    dh.setup()
    torch.manual_seed(0)
    with open(EXAMPLE) as handle:
        config = json.load(handle)
    config["zero_optimization"]["stage"] = stage
    config["train_micro_batch_size_per_gpu"] = 1
    config["capacity_aware"].update(apply_in_training=True, capacity_factor=1.0, min_capacity=0)
    config["capacity_aware"]["log"].update(interval=3, jsonl=None)
    # DeepSpeed's own monitor receives the load statistics.
    config["csv_monitor"] = {"enabled": True, "output_path": tmp, "job_name": f"stage{stage}"}
    model = _Net(ep_size=world_size, k=2)
    if apply_before:
        apply(model, config)
    router = model.moe.deepspeed_moe.gate.wg.weight
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if not apply_before:
        apply(engine, config)
    gate = engine.module.moe.deepspeed_moe.gate
    assert isinstance(gate, CapacityAwareGate) and gate.wg.weight is router
    tracker = tracker_from_ds_config(engine, config)
    before = router.detach().clone()
    losses = []
    for step in range(3):
        x = dh.local_tokens(rank + 10 * step, 12)
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        tracker.step(step + 1)
        losses.append(float(loss))
    trained = not torch.equal(before, engine.module.moe.deepspeed_moe.gate.wg.weight.detach())
    engine.eval()
    with torch.no_grad():
        eval_loss = float(engine(dh.local_tokens(rank, 30)))
    return losses, trained, eval_loss, int(gate.last_plan.num_dropped)


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("apply_before", [True, False])
def test_training_and_inference_under_deepspeed_initialize(stage, apply_before, tmp_path):
    results = run_gloo(_engine_run, 2, stage, apply_before, str(tmp_path), env=ENV)
    written = {p.name for p in tmp_path.rglob("*.csv")}
    assert any("capaware" in name and "straggler_expert_before" in name for name in written), written
    for losses, trained, eval_loss, _ in results:
        assert all(torch.isfinite(torch.tensor(losses)))
        assert trained, "the router weights must keep training after the gate swap"
        assert torch.isfinite(torch.tensor(eval_loss))
    assert sum(r[3] for r in results) > 0


def test_section_parses_the_example():
    section = parse_section(EXAMPLE)
    assert section.capacity.capacity_factor == 1.5 and section.capacity.min_capacity == 4
    assert section.log["interval"] == 10


@pytest.mark.parametrize(
    "patch,error,match",
    [
        ({"capacity_factor": 0}, ValueError, '"capacity_aware": capacity_factor must be > 0'),
        ({"policy": "drop_all"}, ValueError, "policy must be one of"),
        ({"capacity_facter": 1.0}, ValueError, r"unknown key\(s\) \['capacity_facter'\]"),
        ({"log": {"intervall": 3}}, ValueError, r"unknown key\(s\) \['intervall'\] in \"capacity_aware.log\""),
        ({"log": {"interval": -1}}, ValueError, "must be >= 0"),
        ({"log": {"per_expert": "yes"}}, TypeError, "per_expert"),
        ({"min_capacity": "8"}, FileNotFoundError, "min_capacity: no calibration file at .8."),
        ({"min_capacity": 2.5}, TypeError, "min_capacity must be an int"),
    ],
)
def test_section_errors(patch, error, match):
    with open(EXAMPLE) as handle:
        config = json.load(handle)
    bad = copy.deepcopy(config)
    bad["capacity_aware"].update(patch)
    with pytest.raises(error, match=match):
        parse_section(bad)


def test_missing_section_and_no_moe_layer():
    with pytest.raises(ValueError, match='no "capacity_aware" section'):
        parse_section({"train_batch_size": 1})
    from capaware_megatron.deepspeed import apply

    with pytest.raises(ValueError, match="no DeepSpeed MoE layer"):
        apply(torch.nn.Linear(2, 2), EXAMPLE)
