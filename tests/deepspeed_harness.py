"""Worker-side helpers of the DeepSpeed tests: comm set-up, MoE layers with distinct experts,
and the dense single-process reference of a whole MoE layer."""

from __future__ import annotations

import importlib
import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

HIDDEN, FFN, EXPERTS = 12, 20, 8


def setup() -> None:
    """DeepSpeed's comm on top of the gloo group run_gloo made (shm op build skipped)."""
    import warnings

    warnings.filterwarnings("ignore")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def expert_weights(index: int):
    """(fc1 [F, H], fc2 [H, F]) of global expert `index`: every expert differs."""
    gen = torch.Generator().manual_seed(500 + index)
    scale = 0.4 + 0.15 * index
    return torch.randn(FFN, HIDDEN, generator=gen) * scale, torch.randn(HIDDEN, FFN, generator=gen) * scale


def gate_weight() -> torch.Tensor:
    gen = torch.Generator().manual_seed(77)
    weight = torch.randn(EXPERTS, HIDDEN, generator=gen)
    weight[:2] += 1.5 * torch.randn(HIDDEN, generator=gen)  # hot experts, as after training
    return weight


def expert_module() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, FFN, bias=False), torch.nn.GELU(), torch.nn.Linear(FFN, HIDDEN, bias=False)
    )


def moe_layer(ep_size: int, k: int, create_groups: bool = True, **kwargs):
    """deepspeed.moe.layer.MoE with distinct experts; its parallel groups created unless an
    engine will create them (deepspeed.initialize)."""
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    defaults = dict(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, use_rts=False,
                    top2_2nd_expert_sampling=False)
    moe = MoE(HIDDEN, expert_module(), num_experts=EXPERTS, ep_size=ep_size, k=k, **{**defaults, **kwargs})
    if create_groups:
        moe.set_deepspeed_parallelism()
        ep_rank = dist.get_rank(moe.deepspeed_moe.ep_group)
    else:  # DeepSpeed's expert-parallel groups are runs of consecutive ranks
        ep_rank = dist.get_rank() % ep_size
    local = moe.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        for i, expert in enumerate(local):
            fc1, fc2 = expert_weights(ep_rank * len(local) + i)
            expert[0].weight.copy_(fc1)
            expert[2].weight.copy_(fc2)
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_weight())
    return moe


def local_tokens(rank: int, num_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(900 + rank)
    return torch.randn(1, num_tokens, HIDDEN, generator=gen)


def router(x: torch.Tensor, k: int):
    """(scores, routing_map, combine weights) as the capacity-aware gate computes them."""
    scores = torch.softmax(x.reshape(-1, HIDDEN).float() @ gate_weight().t(), dim=1)
    top = torch.topk(scores, k, dim=1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
    combine = scores * routing_map
    if k > 1:
        combine = combine / combine.sum(1, keepdim=True)
    return scores, routing_map, combine


def dense_moe(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_e weights[t, e] * expert_e(x_t), every expert on every token, in one process."""
    flat = x.reshape(-1, HIDDEN)
    out = torch.zeros_like(flat)
    for e in range(EXPERTS):
        fc1, fc2 = expert_weights(e)
        out += weights[:, e : e + 1] * (torch.nn.functional.gelu(flat @ fc1.t()) @ fc2.t())
    return out.reshape(x.shape)
