"""Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen3-MoE, DeepSeek-V3) in Megatron-Core with capaware.

Tiny random-weight models made from transformers configs (tests/hf_tiny.py), saved as HF
checkpoints, converted by ModelOpt's importer (capaware_megatron.hf), run at EP1 and EP2 (gloo,
each rank the same batch). Held: dropless capaware equals stock alltoall bit for bit and the HF
model within 5e-5; a capped plan ranks and weighs each pair by the HF gate's own probability
(its picks and weights, bias-free, renormalised and scaled as the gate does), keeps DeepSeek-V3's
group limit, and the capped model equals a dense HF reference (the loop planner on the HF gate,
every expert through the HF experts module, shared experts uncapped).
"""

import functools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("modelopt")

from hf_tiny import ARCHITECTURES, VOCAB, as_router_weighs, capped_reference, group_mask, hf_logits, make_checkpoint  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402

POLICIES = ("drop", "reroute", "expanded")
GAMMA = 0.75
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def _cases():
    cases = [(arch, "stock", "alltoall", None) for arch in ARCHITECTURES]
    cases += [(arch, "dropless", "capaware", CapacityConfig(None)) for arch in ARCHITECTURES]
    cases += [(arch, policy, "capaware", CapacityConfig(GAMMA, policy=policy, reroute_rounds=4))
              for arch in ARCHITECTURES for policy in POLICIES]
    # Shared experts under a cap that drops most routed assignments (C = 2 of T k / E = 12).
    cases.append(("deepseek_v3", "starved", "capaware", CapacityConfig(0.15)))
    return cases


def _run_models(rank, world_size, paths, cases, tokens):
    """Each case's logits on this rank, with what each capaware MoE layer planned from."""
    from megatron_harness import Layout, model_forward, record_plans, setup

    from capaware_megatron.hf import build_model, inspect_checkpoint

    setup(Layout(ep=world_size, world_size=world_size))
    results = {}
    for arch, label, dispatcher, capacity in cases:
        model = build_model(inspect_checkpoint(paths[arch]), capacity, dispatcher)
        layers = []
        for layer in model.decoder.layers:
            if hasattr(layer.mlp, "token_dispatcher") and dispatcher == "capaware":
                record = {"plans": record_plans(layer.mlp), "hidden": []}
                layer.mlp.register_forward_pre_hook(
                    lambda _m, args, record=record: record["hidden"].append(args[0].detach()))
                layers.append(record)
        with torch.no_grad():
            logits = model_forward(model, tokens)
        results[(arch, label)] = {"logits": logits, "layers": layers,
                                  "local_experts": list(model.decoder.layers[-1].mlp.local_expert_indices)}
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_checkpoint(arch, str(root / arch)) for arch in ARCHITECTURES}


@functools.lru_cache(maxsize=None)
def _runs(paths_items, world_size):
    return run_gloo(_run_models, world_size, dict(paths_items), _cases(), TOKENS, timeout=900)


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def runs(request, checkpoints):
    return _runs(tuple(sorted(checkpoints.items())), request.param)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dropless_capaware_equals_stock_alltoall_and_the_hf_model(arch, runs, checkpoints):
    expected = hf_logits(checkpoints[arch], TOKENS)
    for rank, result in enumerate(runs):
        stock, capaware = result[(arch, "stock")]["logits"], result[(arch, "dropless")]["logits"]
        assert torch.equal(capaware, stock), (arch, rank)
        torch.testing.assert_close(stock, expected, atol=5e-5, rtol=1e-5)


def _hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_plan_ranks_by_the_hf_gates_probability(arch, policy, runs, checkpoints):
    model = _hf_model(checkpoints[arch])
    sparse = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for result in runs:
        layers = result[(arch, policy)]["layers"]
        assert len(layers) == len(sparse)
        for block, record in zip(sparse, layers):
            (hidden,), ((scores, routing_map, probs, plan),) = record["hidden"], record["plans"]
            with torch.no_grad():
                logits, weights, indices = block.gate(hidden.reshape(-1, hidden.shape[-1]))
            picks = torch.zeros_like(routing_map).scatter(1, indices, True)
            assert torch.equal(routing_map, picks), "Megatron's router picks the HF gate's experts"
            torch.testing.assert_close(scores.gather(1, indices), weights.float())
            if policy != "drop":  # alternatives: weighed as the gate would have weighed them
                expected = as_router_weighs(arch, model.config, logits, picks)
                torch.testing.assert_close(scores[~picks], expected[~picks])
            if arch == "deepseek_v3":
                bias = block.gate.e_score_correction_bias
                unbiased = logits.sigmoid().topk(model.config.num_experts_per_tok, dim=-1).indices
                assert not torch.equal(torch.zeros_like(picks).scatter(1, unbiased, True), picks), \
                    "the bias must change some picks for this test to tell the scores apart"
                assert bias.abs().max() > 0.1
                moved = plan.routing_map & ~picks
                assert not (moved & ~group_mask(model.config, picks)).any(), "group limit kept"
                if policy != "drop":  # the groups hold unpicked experts: something must move
                    assert moved.any()
            assert int(plan.num_dropped) > 0


@pytest.mark.parametrize("label", POLICIES + ("starved",))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capped_logits_equal_a_dense_hf_reference(arch, label, runs, checkpoints):
    if label == "starved" and arch != "deepseek_v3":
        pytest.skip("shared experts: DeepSeek-V3")
    cfg = next(capacity for a, l, _d, capacity in _cases() if (a, l) == (arch, label))
    for rank, result in enumerate(runs):
        run = result[(arch, label)]
        model = _hf_model(checkpoints[arch])
        capped_reference(arch, model, cfg, local_experts=run["local_experts"])
        with torch.no_grad():
            expected = model(TOKENS).logits
        torch.testing.assert_close(run["logits"], expected, atol=5e-5, rtol=1e-5)
        dropless = result[(arch, "dropless")]["logits"]
        assert not torch.allclose(run["logits"], dropless, atol=1e-3), "the cap must change the logits"
        if label == "starved":
            plans = [record["plans"][0][3] for record in run["layers"]]
            assert all(int(p.num_dropped) > int(p.tokens_per_expert_after.sum()) for p in plans)
