"""Each Hugging Face MoE architecture as Megatron-Core builds it: TransformerConfig fields from the
HF config, the weight-import rules, and the router semantics the config must have.

The rules are NVIDIA ModelOpt's maintained Megatron-Core import mappings
(``modelopt.torch.export.plugins.mcore_common.all_mcore_hf_import_mapping``) where ModelOpt has
one (Qwen3-MoE, DeepSeek-V2/V3). Mixtral has none there; its table is written in ModelOpt's own
primitives and follows the HF names of Megatron-LM's ``tools/checkpoint/loader_mixtral_hf.py``
(w1 gate, w3 up, w2 down, block_sparse_moe.gate router).

OLMoE's tensors carry Qwen3-MoE's HF names (q_norm, k_norm, mlp.gate, experts.N.gate_proj/
up_proj/down_proj), so ModelOpt's Qwen3-MoE rules import it; its q_norm and k_norm span all heads.

Routers, as Megatron-Core's ``topk_routing_with_score_function`` reproduces each HF gate:
- Mixtral, Qwen3-MoE / OLMoE with norm_topk_prob: softmax over the top-k logits = softmax,
  top-k, renormalised (``moe_router_pre_softmax=False``); without renormalisation (OLMoE's
  default): softmax over all experts, then top-k (``pre_softmax=True``).
- DeepSeek-V3: sigmoid scores; experts picked on scores + e_score_correction_bias
  (``moe_router_enable_expert_bias``), within the top ``topk_group`` of ``n_group`` groups ranked by
  the sum of their two best biased scores (Megatron ranks groups by their top k / group_topk,
  hence the check k = 2 x topk_group); weights are the bias-free scores renormalised over the
  picks, times ``routed_scaling_factor``; shared experts beside the routed ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict

import torch

from .errors import CheckpointError


def rope_theta(hf: Any) -> float:
    """RoPE's base of the config, either transformers spelling."""
    rope = getattr(hf, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def _rope_scaling(hf: Any) -> dict:
    """The rope scaling of the config ({} for plain RoPE), either transformers spelling."""
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return {} if rope_type in ("default", None) else {**rope, "rope_type": rope_type}


def _require(hf: Any, field: str, allowed: Callable[[Any], bool], what: str) -> None:
    value = getattr(hf, field, None)
    if not allowed(value):
        raise CheckpointError(f"{type(hf).__name__}.{field}={value!r} is not supported: {what}")


def _common_fields(hf: Any) -> Dict[str, Any]:
    """Fields every supported decoder shares: RMSNorm, SwiGLU, RoPE, no linear biases."""
    _require(hf, "hidden_act", lambda v: v == "silu", "the experts are SwiGLU (hidden_act 'silu')")
    if _rope_scaling(hf) and not getattr(hf, "q_lora_rank", None) and not hasattr(hf, "kv_lora_rank"):
        raise CheckpointError(
            f"{type(hf).__name__}.rope_parameters={_rope_scaling(hf)!r}: only plain RoPE is "
            "supported for this architecture (scaled RoPE is supported for DeepSeek's MLA)")
    heads = hf.num_attention_heads
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf, "num_key_value_heads", None) or heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        ffn_hidden_size=hf.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(hf, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_topk=hf.num_experts_per_tok,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )


def _mixtral(hf: Any) -> Dict[str, Any]:
    _require(hf, "sliding_window", lambda v: v is None, "sliding-window attention is not converted")
    return dict(
        _common_fields(hf),
        num_moe_experts=hf.num_local_experts,
        moe_ffn_hidden_size=hf.intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
    )


def _moe_layer_freq(num_layers: int, is_moe: Callable[[int], bool]) -> list:
    return [int(is_moe(layer)) for layer in range(num_layers)]


def _qwen3_moe(hf: Any) -> Dict[str, Any]:
    _require(hf, "use_sliding_window", lambda v: not v, "sliding-window attention is not converted")
    dense = set(getattr(hf, "mlp_only_layers", None) or ())
    step = getattr(hf, "decoder_sparse_step", 1)
    return dict(
        _common_fields(hf),
        qk_layernorm=True,
        num_moe_experts=hf.num_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.norm_topk_prob,
        # transformers: layer i is sparse when not in mlp_only_layers and (i + 1) % step == 0.
        moe_layer_freq=_moe_layer_freq(
            hf.num_hidden_layers, lambda i: i not in dense and step > 0 and (i + 1) % step == 0),
    )


def _olmoe(hf: Any) -> Dict[str, Any]:
    _require(hf, "clip_qkv", lambda v: v is None, "clipping of q, k and v is not converted")
    return dict(
        _common_fields(hf),
        qk_layernorm=True,  # over all heads at once (Architecture.full_width_qk_norm)
        num_moe_experts=hf.num_experts,
        moe_ffn_hidden_size=hf.intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.norm_topk_prob,
    )


def _deepseek_v3(hf: Any) -> Dict[str, Any]:
    _require(hf, "norm_topk_prob", bool, "Megatron-Core's sigmoid router renormalises its top-k")
    _require(hf, "rope_interleave", lambda v: v is None or bool(v),
             "Megatron-Core's MLA applies interleaved RoPE (rope_interleave true)")
    _require(hf, "topk_method", lambda v: v in (None, "noaux_tc"), "only 'noaux_tc' routing")
    groups, group_topk = hf.n_group or 1, hf.topk_group or 1
    if groups > 1 and hf.num_experts_per_tok != 2 * group_topk:
        raise CheckpointError(
            f"DeepseekV3Config: num_experts_per_tok={hf.num_experts_per_tok} with "
            f"topk_group={group_topk}: DeepSeek-V3 ranks groups by their two best experts and "
            "Megatron-Core by their num_experts_per_tok / topk_group best; they agree only when "
            "num_experts_per_tok = 2 x topk_group")
    fields = dict(
        _common_fields(hf),
        multi_latent_attention=True,
        qk_layernorm=True,  # MLA: the q_a and kv_a latents' RMSNorms
        rotary_base=rope_theta(hf),
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        num_moe_experts=hf.n_routed_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(hf.n_shared_experts or 0) * hf.moe_intermediate_size or None,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=group_topk if groups > 1 else None,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        moe_layer_freq=_moe_layer_freq(hf.num_hidden_layers, lambda i: i >= hf.first_k_dense_replace),
    )
    scaling = _rope_scaling(hf)
    if not scaling:
        fields.update(rope_type="rope")
    elif scaling["rope_type"] == "yarn":
        fields.update(
            rope_type="yarn",
            rotary_scaling_factor=scaling["factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
            beta_fast=scaling.get("beta_fast", 32.0),
            beta_slow=scaling.get("beta_slow", 1.0),
            mscale=scaling.get("mscale", 1.0),
            mscale_all_dim=scaling.get("mscale_all_dim", 0.0),
        )
    else:
        raise CheckpointError(f"DeepseekV3Config.rope_parameters: rope_type {scaling['rope_type']!r} "
                              "is not supported (plain or 'yarn')")
    return fields


def _modelopt_rules(architecture: str) -> Callable[[], dict]:
    def rules() -> dict:
        from modelopt.torch.export.plugins.mcore_common import all_mcore_hf_import_mapping

        return all_mcore_hf_import_mapping[architecture]

    return rules


def _mixtral_rules() -> dict:
    from modelopt.torch.export.plugins.mcore_custom import (
        COL_ETP, COL_TP, REPLICATE, ROW_ETP, ROW_TP, GatedMLPMerging, NameRemapping, QKVMerging)

    moe = "model.layers.{}.block_sparse_moe."
    return {
        "word_embeddings": NameRemapping("model.embed_tokens.", COL_TP),
        "final_layernorm": NameRemapping("model.norm.", REPLICATE),
        "output_layer": NameRemapping("lm_head.", COL_TP),
        "input_layernorm": NameRemapping("model.layers.{}.input_layernorm.", REPLICATE),
        "linear_qkv": QKVMerging("model.layers.{}.self_attn.", COL_TP),
        "linear_proj": NameRemapping("model.layers.{}.self_attn.o_proj.", ROW_TP),
        "pre_mlp_layernorm": NameRemapping("model.layers.{}.post_attention_layernorm.", REPLICATE),
        "router": NameRemapping(moe + "gate.", REPLICATE),
        "local_experts.linear_fc1": GatedMLPMerging(
            moe + "experts.{}.", {**COL_ETP, "gate_proj_name": "w1", "up_proj_name": "w3"}),
        "local_experts.linear_fc2": NameRemapping(moe + "experts.{}.w2.", ROW_ETP),
    }


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HF architecture (``config.architectures[0]``) as Megatron-Core builds it."""

    name: str
    transformer_fields: Callable[[Any], Dict[str, Any]]
    """HF config -> TransformerConfig / MLATransformerConfig fields (raises CheckpointError)."""
    import_rules: Callable[[], dict]
    """ModelOpt's import mapping (module role -> CustomModuleMapping) for this architecture."""
    full_width_qk_norm: bool = False
    """OLMoE: q_norm and k_norm are RMSNorms over all heads' projections at once (Megatron-Core's
    qk_layernorm normalises each head)."""


ARCHITECTURES: Dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("MixtralForCausalLM", _mixtral, _mixtral_rules),
        Architecture("OlmoeForCausalLM", _olmoe, _modelopt_rules("Qwen3MoeForCausalLM"),
                     full_width_qk_norm=True),  # OLMoE's HF names are Qwen3-MoE's
        Architecture("Qwen3MoeForCausalLM", _qwen3_moe, _modelopt_rules("Qwen3MoeForCausalLM")),
        Architecture("DeepseekV3ForCausalLM", _deepseek_v3, _modelopt_rules("DeepseekV3ForCausalLM")),
    )
}
