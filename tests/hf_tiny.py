"""Tiny random-weight Hugging Face MoE checkpoints made from transformers configs (no download).

Weights are drawn with a large initializer range so the experts, not the residual stream, move
the logits: a wrong expert, weight or routing decision shows in the outputs.
"""

from __future__ import annotations

import torch

VOCAB, EXPERTS, SEQ = 96, 8, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=SEQ, initializer_range=0.3, tie_word_embeddings=False)


def _configs():
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=24, num_key_value_heads=2,
                                    num_local_experts=EXPERTS, num_experts_per_tok=2),
        "olmoe": tf.OlmoeConfig(**COMMON, intermediate_size=24, num_key_value_heads=2,
                                num_experts=EXPERTS, num_experts_per_tok=2),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                       num_key_value_heads=2, head_dim=8, num_experts=EXPERTS,
                                       num_experts_per_tok=2, norm_topk_prob=True),
        # n_group 4 x 2 experts, topk_group 2, k 4 (DeepSeek-V3's k = 2 x topk_group), one shared
        # expert, a dense first layer, q LoRA; the correction bias drawn large so that it changes
        # which experts are picked (a bias-shifted score would then show in the plan).
        "deepseek_v3": tf.DeepseekV3Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=4,
            n_routed_experts=EXPERTS, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
            topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
            rope_scaling=None),
    }


ARCHITECTURES = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3")


def make_checkpoint(name: str, path: str, seed: int = 0, **config_overrides) -> str:
    """Save a tiny random `name` model (one of ARCHITECTURES) under `path`."""
    import transformers

    config = _configs()[name]
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.5)
    model.save_pretrained(path)
    return path


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of the transformers model itself."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def as_router_weighs(name: str, hf_config, logits: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E] each expert's weight as the HF gate would weigh it had it picked it, from the gate's
    own code: Mixtral and Qwen3-MoE (norm_topk_prob) renormalise the softmax over the picks,
    OLMoE (no norm_topk_prob) takes it as it is, DeepSeek-V3 renormalises the bias-free sigmoid,
    times routed_scaling_factor."""
    logits = logits.float()
    if name == "deepseek_v3":
        scores = logits.sigmoid()
        picked = (scores * routing_map).sum(-1, keepdim=True) + 1e-20
        return scores / picked * hf_config.routed_scaling_factor
    probs = torch.softmax(logits, -1)
    if name in ("olmoe", "qwen3_moe") and not hf_config.norm_topk_prob:
        return probs
    return probs / (probs * routing_map).sum(-1, keepdim=True)


def group_mask(hf_config, routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E]: DeepSeek-V3's experts in the groups that hold one of a token's picks."""
    groups = hf_config.n_group
    in_group = routing_map.view(routing_map.shape[0], groups, -1).any(-1)
    return in_group.repeat_interleave(routing_map.shape[1] // groups, dim=1)


def capped_reference(name: str, model, cfg, local_experts) -> None:
    """Replace every sparse MoE block's forward of the HF `model` by a dense capacity-aware one:
    the HF gate's own picks and weights, the loop reference planner (tests/reference.py), every
    expert applied with its planned weight through the HF experts module, shared experts
    (DeepSeek-V3) added for every token, uncapped."""
    from reference import reference_plan

    hf_config = model.config
    for layer in model.model.layers:
        block = layer.mlp
        if not hasattr(block, "gate"):
            continue  # a dense layer

        def forward(hidden, block=block):
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits, weights, indices = block.gate(flat)
            routing_map = torch.zeros(logits.shape, dtype=torch.bool).scatter(1, indices, True)
            probs = torch.zeros(logits.shape).scatter(1, indices, weights.float())
            scores = torch.where(routing_map, probs, as_router_weighs(name, hf_config, logits, routing_map))
            eligible = group_mask(hf_config, routing_map) if name == "deepseek_v3" else None
            new_map, new_probs, _ = reference_plan(
                scores, routing_map, cfg, local_experts=local_experts, probs=probs, eligible=eligible)
            every = torch.arange(logits.shape[1]).expand(flat.shape[0], -1)
            out = block.experts(flat, every, new_probs.to(flat.dtype)).view_as(hidden)
            if getattr(block, "shared_experts", None) is not None:
                out = out + block.shared_experts(hidden)
            return out

        block.forward = forward
