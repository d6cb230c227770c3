"""Build a Megatron-Core GPTModel for a checked HF checkpoint and import its weights.

The model is built for the process's Megatron parallel state (TP, EP, expert-TP, PP: each rank
builds its own stage and shards) with Megatron-Core's local layer spec, and ModelOpt's importer
reads each rank's shards from the safetensors files. Needs torch.distributed and
``parallel_state.initialize_model_parallel`` first (one process: world size 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional
from unittest import mock

import torch

from ..config import CapacityConfig
from .checkpoint import Checkpoint
from .errors import CheckpointError


def transformer_config(checkpoint: Checkpoint, dispatcher: str = "capaware",
                       capacity: Optional[CapacityConfig] = None,
                       dtype: torch.dtype = torch.float32, **overrides: Any):
    """The (MLA)TransformerConfig of `checkpoint` for this process's parallel state (sequence
    parallelism with TP unless `overrides` say otherwise); the capaware dispatcher's
    CapacityConfig attached when given."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    from ..megatron import set_capacity_config

    fields = dict(
        checkpoint.transformer_fields,
        moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=parallel_state.get_tensor_model_parallel_world_size() > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    fields.update(overrides)
    config_class = MLATransformerConfig if fields.get("multi_latent_attention") else TransformerConfig
    config = config_class(**fields)
    if capacity is not None:
        set_capacity_config(config, capacity)
    return config


def _layer_spec(config, checkpoint: Checkpoint):
    """Megatron-Core's local block spec (moe_layer_freq's dense and MoE layers, MLA), its MLA
    layers' core attention the local one that takes MLA's head sizes, OLMoE's QK norms over
    all heads."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    for layer in spec.layer_specs:
        attention = layer.submodules.self_attention
        if attention.module is MLASelfAttention:
            attention.submodules.core_attention = _mla_core_attention()
        elif checkpoint.architecture.full_width_qk_norm:
            attention.submodules.q_layernorm = _full_width_rms_norm("num_attention_heads")
            attention.submodules.k_layernorm = _full_width_rms_norm("num_query_groups")
    return spec


def _full_width_rms_norm(heads_field: str):
    """An RMSNorm over all heads of q (or k) at once, as OLMoE's q_norm and k_norm: Megatron-Core
    builds a QK norm with one head's width and applies it to [s, b, heads, head_dim]."""

    class FullWidthRMSNorm(torch.nn.Module):
        def __init__(self, hidden_size: int, config, eps: float = 1e-5):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size * getattr(config, heads_field)))
            self.eps = eps

        def forward(self, heads: torch.Tensor) -> torch.Tensor:
            flat = heads.reshape(*heads.shape[:-2], -1)
            normed = torch.nn.functional.rms_norm(flat.float(), flat.shape[-1:], eps=self.eps)
            return (self.weight * normed.to(flat.dtype)).view_as(heads)

    return FullWidthRMSNorm


def _mla_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        """The local DotProductAttention under MLA. Megatron-Core 0.19's MLASelfAttention passes
        k_channels and v_channels (query-key and value heads differ: nope + rope vs v_head_dim),
        which only Transformer Engine's attention accepts; the local one reads a head size only
        for its output width, the value heads', and MLA passes its softmax scale."""

        def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
            if v_channels is not None:
                config = dataclasses.replace(config, kv_channels=v_channels)
            super().__init__(config, *args, **kwargs)

    return MLADotProductAttention


class _Importer:
    """ModelOpt's GPTModelImporter with this project's rules for architectures ModelOpt has
    none for (Mixtral), added to its rule book for the one import."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def run(self, model, dtype: torch.dtype) -> None:
        from modelopt.torch.export.plugins import megatron_importer

        name = self.checkpoint.architecture.name
        extra = {} if name in megatron_importer.all_mcore_hf_import_mapping else {
            name: self.checkpoint.architecture.import_rules()}
        with mock.patch.dict(megatron_importer.all_mcore_hf_import_mapping, extra):
            importer = megatron_importer.GPTModelImporter(
                model, self.checkpoint.path, dtype=dtype, moe_router_dtype="fp32")
        importer._import_state_dict()


def build_model(checkpoint: Checkpoint, capacity: Optional[CapacityConfig] = None,
                dispatcher: str = "capaware", dtype: torch.dtype = torch.float32,
                import_weights: bool = True, **overrides: Any):
    """The GPTModel of `checkpoint` for this rank (its pipeline stage, TP / EP shards), weights
    imported (unless `import_weights` is False: a Megatron checkpoint is loaded into it next), in
    eval mode. `dispatcher` "capaware" (with `capacity`) or a stock one ("alltoall")."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from ..megatron import install

    if checkpoint.architecture.full_width_qk_norm and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise CheckpointError(
            f"{checkpoint.architecture.name}: its q_norm and k_norm span all attention heads, "
            "which tensor parallelism would split over ranks; run it with TP 1")
    install()
    config = transformer_config(checkpoint, dispatcher, capacity, dtype, **overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(config, checkpoint),
        vocab_size=checkpoint.vocab_size,
        max_sequence_length=checkpoint.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=checkpoint.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=checkpoint.rotary_base,
    )
    if import_weights:
        with torch.no_grad():
            _Importer(checkpoint).run(model, dtype)
    return model.eval()
