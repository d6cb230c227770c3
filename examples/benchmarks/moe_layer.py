"""The Megatron-Core MoE layer the layer benchmarks time (inside a gloo rank, after
cpu_shims.apply(), install() and initialize_model_parallel)."""

from __future__ import annotations

from typing import Optional

import torch

from capaware_megatron import CapacityConfig


def build_moe_layer(dispatcher: str, ep: int, hidden: int, ffn: int, experts: int, topk: int,
                    capaware: Optional[CapacityConfig] = None):
    """A local-spec MoE layer in eval mode, the same weights for every call (seeded): the runs a
    benchmark compares differ only in their dispatcher and CapacityConfig."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from capaware_megatron.megatron import set_capacity_config

    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=8, num_moe_experts=experts,
        moe_router_topk=topk, moe_ffn_hidden_size=ffn, moe_token_dispatcher_type=dispatcher,
        use_cpu_initialization=True, add_bias_linear=False, moe_router_load_balancing_type="none",
        params_dtype=torch.float32, expert_model_parallel_size=ep,
    )
    if capaware is not None:
        set_capacity_config(config, capaware)
    torch.manual_seed(0)
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
    return spec.submodules.mlp(config=config).eval()
