"""Padding rows take no capacity in Megatron's CUDA-graph decode (issue 24).

Megatron pads a CUDA-graph decode batch with dummy tokens and publishes the step's real token
count in a device tensor (the dynamic context's ``gpu_view.real_token_count``, bound to the
dispatcher as install() binds it). A small MoE GPTModel under ``set_decode_expert_padding`` over
gloo, EP2 and EP4, each rank with its own number of real tokens among 8 rows: the real tokens'
outputs equal those of the same tokens unpadded (an eager step of the real tokens alone) under
the same cap, for drop / reroute / expanded and scopes local / device / global. Also: a decode
capacity factor caps decode steps only, a padding mask handed to the router counts the same,
and the whole padded step (router, plan with the mask and a floor, permutation, all-to-alls) has
no host sync.
"""

import pytest
import torch
from capaware_megatron.multiprocess import run_gloo
from megatron_harness import Layout

from capaware_megatron import CapacityConfig

pytest.importorskip("megatron.core")

ROWS = 8  # the CUDA graph's batch: rows per rank
REAL = {2: [5, 8], 4: [3, 8, 1, 6]}  # real tokens per rank
CONFIGS = {f"{policy}-{scope}": CapacityConfig(1.0, policy=policy, scope=scope)
           for policy in ("drop", "reroute", "expanded") for scope in ("local", "device", "global")}


def _step_tokens(rank: int) -> torch.Tensor:
    """[ROWS, 1] one decode step's token ids; the rows past the real count are dummies."""
    from megatron_harness import VOCAB

    return torch.randint(0, VOCAB, (ROWS, 1), generator=torch.Generator().manual_seed(40 + rank))


def _padded_and_unpadded(model, tokens, real):
    """(padded decode step's logits of the real rows, eager logits of the real tokens alone,
    the padded plans)."""
    import megatron_harness as mh
    from megatron.core.inference import utils as inference_utils
    from megatron.core.inference.utils import InferenceMode

    from capaware_megatron.megatron.dispatcher import CapacityAwareTokenDispatcher

    inference_utils.moe_layer_cache = None
    dispatchers = [layer.mlp.token_dispatcher for layer in model.decoder.layers]
    model.eval()
    with torch.no_grad(), InferenceMode.active():
        CapacityAwareTokenDispatcher.set_real_token_count_tensor(torch.tensor([real], dtype=torch.int32))
        mh.switch_decode_padding(model, padded=True)
        padded = mh.model_forward(model, tokens)[:real]
        plans = [d.last_plan for d in dispatchers]
        CapacityAwareTokenDispatcher.set_real_token_count_tensor(None)
        mh.switch_decode_padding(model, padded=False)
        unpadded = mh.model_forward(model, tokens[:real])
    return padded, unpadded, plans


def _padding_checks(rank, world_size):
    import megatron_harness as mh

    layout = Layout(ep=world_size, world_size=world_size)
    mh.setup(layout)
    real, tokens = REAL[world_size][rank], _step_tokens(rank)
    results = {}
    for name, cfg in CONFIGS.items():
        padded, unpadded, plans = _padded_and_unpadded(mh.gpt_model(layout, "capaware", cfg), tokens, real)
        results[name] = dict(padded=padded, unpadded=unpadded,
                             routed=[int(p.tokens_per_expert_before.sum()) for p in plans],
                             moved=sum(int(p.num_dropped) + int(p.num_rerouted) for p in plans))
    # A decode factor alone: prefill dropless (stock), decode capped like gamma 1.0.
    decode_only = mh.gpt_model(layout, "capaware", CapacityConfig(decode_capacity_factor=1.0))
    results["decode-only"] = dict(zip(("padded", "unpadded"), _padded_and_unpadded(decode_only, tokens, real)[:2]))
    stock = mh.gpt_model(layout, "alltoall")
    with torch.no_grad():
        results["stock-eager"] = mh.model_forward(stock.eval(), tokens[:real])
    return dict(results=results, syncs=_padded_step_syncs(layout, rank))


def _padded_step_syncs(layout, rank):
    """Host syncs of one padded decode step of one MoE layer with the real count bound, a
    padding mask and a floor: router, plan, permutations, both all-to-alls."""
    import megatron_harness as mh
    from host_sync import HostSyncRecorder
    from megatron.core.inference import utils as inference_utils
    from megatron.core.inference.utils import InferenceMode, set_decode_expert_padding

    from capaware_megatron.megatron.dispatcher import CapacityAwareTokenDispatcher

    layer = mh.moe_layer(layout, "capaware", CapacityConfig(0.5, policy="reroute", scope="global",
                                                            min_capacity=1)).eval()
    dispatcher = layer.token_dispatcher
    hidden = mh.local_input(ROWS, seed=3 + rank, requires_grad=False).view(-1, mh.HIDDEN)
    padding = torch.arange(ROWS) % 4 == 3  # a mask on top of the count
    count = torch.tensor([REAL[layout.ep][rank]], dtype=torch.int32)
    inference_utils.moe_layer_cache = None  # the controller's cache holds one model's layers
    with torch.no_grad(), InferenceMode.active():
        set_decode_expert_padding(layer, True, capacity_factor=mh.EXPERTS / mh.TOPK)
        CapacityAwareTokenDispatcher.set_real_token_count_tensor(count)
        try:
            with HostSyncRecorder() as syncs:
                probs, routing_map = layer.router(hidden, padding)
                mh.weighted_round_trip(dispatcher, hidden, routing_map, probs)
        finally:
            CapacityAwareTokenDispatcher.set_real_token_count_tensor(None)
    real = (torch.arange(ROWS) < count) & ~padding
    return syncs.ops, int(dispatcher.last_plan.tokens_per_expert_before.sum()), int(real.sum()) * mh.TOPK


@pytest.mark.parametrize("world_size", sorted(REAL))
def test_padding_rows_take_no_capacity_in_decode(world_size):
    import megatron_harness as mh

    per_rank = run_gloo(_padding_checks, world_size, timeout=600)
    for name in CONFIGS:
        assert sum(per_rank[r]["results"][name]["moved"] for r in range(world_size)) > 0, (name, "the cap must bind")
    for rank, result in enumerate(per_rank):
        real = REAL[world_size][rank]
        for name, run in result["results"].items():
            if name in ("stock-eager", "decode-only"):
                continue
            torch.testing.assert_close(run["padded"], run["unpadded"], rtol=1e-5, atol=1e-5,
                                       msg=f"EP{world_size} rank {rank} ({real} real of {ROWS}) {name}")
            if name in CONFIGS:  # only the real tokens were routed into the plan
                assert run["routed"] == [real * mh.TOPK] * 2, (name, run["routed"])
        # A decode factor alone caps the decode step as gamma 1.0 does, and leaves the eager
        # (prefill) step dropless: the stock dispatcher's.
        decode_only = result["results"]["decode-only"]
        torch.testing.assert_close(decode_only["padded"], result["results"]["drop-local"]["padded"])
        torch.testing.assert_close(decode_only["unpadded"], result["results"]["stock-eager"])
        ops, routed, expected = result["syncs"]
        assert ops == [] and routed == expected, (rank, ops, routed, expected)
