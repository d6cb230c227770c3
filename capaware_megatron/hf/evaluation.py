"""Capacity-aware evaluation of a Megatron-Core GPTModel: held-out perplexity and greedy generation.

One model serves every run of a sweep: `set_capacity` switches its capaware layers' CapacityConfig
between runs, so dropless and capped runs share weights, data and shards. Every rank of an
expert-parallel group runs the same number of forwards (EP's all-to-alls pair them up); tensor-
parallel ranks see the same tokens; data-parallel ranks see different windows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config import CapacityConfig


def set_capacity(model: Any, cfg: CapacityConfig) -> int:
    """Give every capaware MoE layer of `model` (a module or a list of chunks) `cfg`; returns
    how many layers took it."""
    from ..megatron.monitoring import _capaware_layers

    count = 0
    for _, dispatcher in _capaware_layers(model):
        dispatcher.capacity_config = cfg
        count += 1
    return count


def token_windows(ids: torch.Tensor, length: int) -> torch.Tensor:
    """[W, length + 1] non-overlapping windows of a [N] token stream: a window's first `length`
    tokens are the inputs, its last `length` the next-token labels; a shorter tail is left out."""
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    count = (ids.numel() - 1) // length
    if count < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length + 1}")
    starts = torch.arange(count) * length
    return ids[starts[:, None] + torch.arange(length + 1)]


def data_parallel_share(windows: torch.Tensor, rank: int, size: int, micro_batch_size: int = 1) -> torch.Tensor:
    """This data-parallel rank's windows, the same whole number of micro-batches on every rank
    (a remainder is left out: every rank of an expert-parallel group, and every micro-batch of
    Megatron's schedule, must run alike)."""
    per_rank = windows.shape[0] // size // micro_batch_size * micro_batch_size
    if per_rank < 1:
        raise ValueError(
            f"{windows.shape[0]} windows for {size} data-parallel ranks x micro-batches of "
            f"{micro_batch_size}: give a longer text, a shorter --seq-length or a smaller "
            "--micro-batch-size")
    return windows[rank : per_rank * size : size]


def causal_mask(length: int, device: Any = None) -> torch.Tensor:
    """[1, 1, S, S] Megatron's attention mask: True where a query may not look."""
    return torch.ones(1, 1, length, length, dtype=torch.bool, device=device).tril().logical_not()


def sum_nll(model: Any, windows: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """[2] float64 (summed next-token negative log-likelihood, token count) of `windows`
    [W, S + 1], `micro_batch_size` windows per forward, through Megatron's forward-only schedule
    (pipeline stages pass activations; the last holds the sums, the others zeros) and its own
    loss (vocab-parallel cross entropy under TP)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    length = windows.shape[1] - 1
    mask = causal_mask(length, device)
    positions = torch.arange(length, device=device)
    batches = list(windows.to(device).split(micro_batch_size))
    if len({batch.shape[0] for batch in batches}) > 1:
        raise ValueError(f"{windows.shape[0]} windows do not split into micro-batches of "
                         f"{micro_batch_size}: every micro-batch of the schedule has one size")

    def loss_sums(loss: torch.Tensor):
        sums = torch.stack([loss.double().sum(), torch.tensor(float(loss.numel()), dtype=torch.float64,
                                                              device=loss.device)])
        return loss.sum(), {"nll": sums}

    def forward_step(data, chunk):
        batch = next(data)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        return chunk(inputs, positions.expand_as(inputs), mask, labels=labels), loss_sums

    with torch.no_grad():
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=len(batches), seq_length=length, micro_batch_size=micro_batch_size,
            forward_only=True)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for entry in reduced:
        total += entry["nll"]
    return total


def forward_reduced(model: Any, tokens: torch.Tensor, mask: Optional[torch.Tensor],
                    reduce: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor,
                    start: int = 0, **model_kwargs: Any) -> torch.Tensor:
    """`reduce(logits)` of one forward of [B, S] `tokens` (positions start .. start + S - 1) on
    every rank. Under pipeline parallelism the forward runs through Megatron's forward-only
    schedule (stages pass activations) and the last stage reduces its [B, S, V] logits (gathered
    over TP) to a small tensor that it broadcasts over its pipeline group (`like`: a tensor of
    that shape and dtype, for the other stages' receive); without, it is the model's own forward,
    as in Megatron's inference wrapper. `model_kwargs` reach every stage (inference_context,
    padding_mask)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, length = tokens.shape
    positions = torch.arange(start, start + length, device=tokens.device).expand(batch, -1)
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return reduce(model(tokens, positions, mask, runtime_gather_output=True, **model_kwargs))
    reduced: list = []

    def keep(logits: torch.Tensor):
        reduced.append(reduce(logits))
        return logits.new_zeros(()), {}

    def forward_step(data, chunk):
        next(data)
        return chunk(tokens, positions, mask, runtime_gather_output=True, **model_kwargs), keep

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=length, micro_batch_size=batch, forward_only=True)
    value = reduced[0] if reduced else torch.empty_like(like)
    dist.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return value


def greedy_tokens(model: Any, prompts: torch.Tensor, max_tokens: int) -> Iterator[torch.Tensor]:
    """Yield the [B] next greedy tokens of [B, P] prompts, up to `max_tokens` times, with
    Megatron's static KV cache: one prefill forward of the prompts, then one decode forward of B
    tokens per new token (the small-T steps where a capacity bites hardest), each through the
    pipeline (forward_reduced). Every rank of the world must run the same prompts: the tokens are
    global rank 0's, so that all ranks stop together even where their logits differ in the last bit."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    device = next(model.parameters()).device
    tokens = prompts.to(device)
    batch, length = tokens.shape
    context = StaticInferenceContext(batch, length + max_tokens)
    distributed = dist.is_available() and dist.is_initialized()
    with torch.no_grad(), InferenceMode.active():
        for step in range(max_tokens):
            inputs = tokens if step == 0 else tokens[:, -1:]
            mask = causal_mask(length, device) if step == 0 else None
            chosen = forward_reduced(model, inputs, mask, lambda logits: logits[:, -1].argmax(-1),
                                     like=tokens[:, 0], start=tokens.shape[1] - inputs.shape[1],
                                     inference_context=context)
            context.sequence_len_offset += inputs.shape[1]
            if distributed:
                dist.broadcast(chosen, src=0)
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            yield chosen


def greedy_generate(model: Any, prompts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, num_tokens] greedy continuation of [B, P] prompts (greedy_tokens)."""
    steps = list(greedy_tokens(model, prompts, num_tokens))
    return torch.stack(steps, dim=1) if steps else prompts.new_zeros(prompts.shape[0], 0)
