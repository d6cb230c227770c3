"""Worker-side helpers of the Megatron tests: parallel set-up, MoE layers with distinct experts.

Every function here runs inside a gloo rank started by capaware_megatron.multiprocess.run_gloo.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

HIDDEN, FFN, EXPERTS, TOPK = 16, 24, 8, 2


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1

    world_size: int = 2


def setup(layout: Layout) -> None:
    """CPU shims, the plugin, and Megatron's parallel state for this layout."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    from capaware_megatron.megatron import cpu_shims, install

    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )


def transformer_config(layout: Layout, dispatcher: str, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=2 * layout.pp, hidden_size=HIDDEN, num_attention_heads=4,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN,
        moe_token_dispatcher_type=dispatcher, use_cpu_initialization=True,
        add_bias_linear=False, moe_router_load_balancing_type="none",
        params_dtype=torch.float32, tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        pipeline_model_parallel_size=layout.pp, sequence_parallel=layout.tp > 1,
        pipeline_dtype=torch.float32,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _distinct_weight(global_index: int, shape: tuple[int, int], salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * salt + global_index)
    return torch.randn(shape, generator=gen) * (0.5 + 0.1 * global_index)


def make_experts_distinct(layer) -> None:
    """Give every expert its own weights (Megatron initialises local experts alike on every rank).

    The full matrices depend only on the global expert index; each rank keeps its expert-TP
    shard (fc1 rows, fc2 columns), so every layout computes the same function.
    """
    from megatron.core import parallel_state

    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    with torch.no_grad():
        for local, expert in enumerate(layer.experts.local_experts):
            global_index = layer.local_expert_indices[local]
            fc1 = _distinct_weight(global_index, (FFN, HIDDEN), salt=1).chunk(etp, dim=0)[etp_rank]
            fc2 = _distinct_weight(global_index, (HIDDEN, FFN), salt=2).chunk(etp, dim=1)[etp_rank]
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)
        gen = torch.Generator().manual_seed(7)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen))
        # A skewed router: experts 0 and 1 are hot, as in trained models.
        layer.router.weight[:2] += 0.8 * torch.randn(HIDDEN, generator=gen)


def moe_layer(layout: Layout, dispatcher: str, capaware=None, **overrides):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from capaware_megatron.megatron import set_capacity_config

    config = transformer_config(layout, dispatcher, **overrides)
    if capaware is not None:
        set_capacity_config(config, capaware)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    layer = spec.submodules.mlp(config=config)
    make_experts_distinct(layer)
    return layer


def record_plans(layer) -> list:
    """Keep what the dispatcher planned from: [scores, routing_map, probs, plan] per forward."""
    records = []
    dispatcher = layer.token_dispatcher
    full_scores = dispatcher._full_scores

    def recording(probs, routing_map):
        scores = full_scores(probs, routing_map)
        records.append([scores.detach(), routing_map, probs.detach()])
        return scores

    dispatcher._full_scores = recording
    dispatcher.plan_observers.append(lambda _d, plan: records[-1].append(plan))
    return records


def local_input(num_tokens: int, seed: int, requires_grad: bool = True) -> torch.Tensor:
    """This rank's [S, 1, H] input: distinct per rank, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, 1, HIDDEN, generator=gen)
    return x.requires_grad_(requires_grad)


def forward_backward(layer, x: torch.Tensor, training: bool = True):
    """(output, input grad, {param name: grad}) of one forward/backward."""
    layer.train(training)
    x = x.detach().clone().requires_grad_(True)
    out, _ = layer(x)
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def gpt_model(layout: Layout, dispatcher: str, capaware=None, **overrides):
    """A 2-layer MoE GPT split over the pipeline stages of this layout, distinct experts."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from capaware_megatron.megatron import set_capacity_config

    config = transformer_config(layout, dispatcher, **overrides)
    if capaware is not None:
        set_capacity_config(config, capaware)
    torch.manual_seed(0)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    for layer in model.decoder.layers:
        make_experts_distinct(layer.mlp)
    return model


VOCAB, SEQ = 64, 12


def pipeline_step(model, forward_only: bool = False):
    """One micro-batch through the pipeline stages with explicit send/recv (Megatron's schedule
    allocates on "cuda"); returns (loss on the last stage else None, {param: grad})."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    group = parallel_state.get_pipeline_model_parallel_group()
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    activation_shape = (SEQ, 2, HIDDEN)  # [s, b, h] between stages

    model.zero_grad(set_to_none=True)
    model.train(not forward_only)
    with torch.set_grad_enabled(not forward_only):
        received = None
        if not first:
            received = torch.empty(activation_shape)
            dist.recv(received, group=group, group_src=parallel_state.get_pipeline_model_parallel_rank() - 1)
            received.requires_grad_(not forward_only)
            model.set_input_tensor(received)
        output = model(tokens, positions, mask, labels=tokens if last else None)
        loss = output.float().mean() if last else None
        if not last:
            dist.send(output.detach().contiguous(), group=group,
                      group_dst=parallel_state.get_pipeline_model_parallel_rank() + 1)
        if not forward_only:
            if last:
                loss.backward()
            else:
                grad = torch.empty(activation_shape)
                dist.recv(grad, group=group, group_src=parallel_state.get_pipeline_model_parallel_rank() + 1)
                output.backward(grad)
            if not first:
                dist.send(received.grad.contiguous(), group=group,
                          group_dst=parallel_state.get_pipeline_model_parallel_rank() - 1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return (None if loss is None else loss.detach()), grads


def weighted_round_trip(dispatcher, hidden: torch.Tensor, routing_map: torch.Tensor,
                        probs: torch.Tensor) -> torch.Tensor:
    """[T, H] hidden back through the dispatcher with identity experts: permute, all-to-all,
    each received row times its permuted weight, combine (Megatron's dispatcher tests' round
    trip: each token's hidden state times the sum of its planned weights)."""
    tokens, weights = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    tokens, weights = dispatcher.token_dispatch(tokens, weights)
    tokens, _, weights = dispatcher.dispatch_postprocess(tokens, weights)
    tokens = dispatcher.combine_preprocess(tokens * weights.unsqueeze(-1).to(tokens.dtype))
    return dispatcher.combine_postprocess(dispatcher.token_combine(tokens))


def model_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of a causal forward over [B, S] token ids (no KV cache)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    mask = torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril().logical_not()
    return model(tokens, positions, mask, runtime_gather_output=True)


def switch_decode_padding(model, padded: bool) -> None:
    """What Megatron's text-generation controller does before a step (a CUDA-graph step: padded)."""
    from megatron.core.inference.utils import set_decode_expert_padding

    if padded:
        set_decode_expert_padding(model, True, capacity_factor=EXPERTS / TOPK)
    else:
        set_decode_expert_padding(model, False)
