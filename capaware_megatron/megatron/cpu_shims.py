"""CPU shims for Megatron-Core 0.19 under torch.distributed gloo: tests and the CPU demo only.

Megatron-Core assumes CUDA in a few places that do not change what it computes:
- the all-to-all dispatcher creates a torch.cuda.Stream and moves split sizes to the host on it;
- communication helpers allocate outputs on torch.cuda.current_device();
- the expert-tensor-parallel path gathers / reduce-scatters uneven splits with the list forms of
  all_gather / reduce_scatter, which gloo rejects;
- the model-parallel RNG tracker forks CUDA generator states.
Each shim replaces the CUDA-only step by its CPU equivalent. The GPU path never imports this
module; `apply()` refuses to run when CUDA is available.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist

_applied = False


class _HostStream:
    """Stands in for torch.cuda.Stream: work on the host is already ordered."""

    def wait_stream(self, _stream) -> None:
        pass

    def record_event(self):
        return _HostEvent()


class _HostEvent:
    def synchronize(self) -> None:
        pass


def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    """all_gather along dim 0 with uneven sizes: pad to the largest, gather, cut."""
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if output_split_sizes is None:
        output_split_sizes = [input_.shape[0]] * world_size
    longest = max(output_split_sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, output_split_sizes)])


def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    """reduce_scatter along dim 0 (even or uneven): all_reduce, keep this rank's slice."""
    world_size = group.size()
    if world_size == 1:
        return input_
    if input_split_sizes is None:
        input_split_sizes = [input_.shape[0] // world_size] * world_size
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    start = sum(input_split_sizes[: group.rank()])
    return total[start : start + input_split_sizes[group.rank()]].clone()


def _dtoh_on_host(self, point: str, tokens_per_expert: Optional[torch.Tensor] = None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without streams."""
    from megatron.core.transformer.moe.moe_utils import maybe_move_tensor_to_cpu

    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        tokens_per_expert = maybe_move_tensor_to_cpu(tokens_per_expert)
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


class _HostRNGTracker:
    """get_cuda_rng_tracker() stand-in: forks are no-ops on the host generator."""

    def __init__(self):
        self.states_ = {}

    def is_initialized(self) -> bool:
        return True

    def add(self, name, seed) -> None:
        self.states_[name] = seed

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states) -> None:
        self.states_ = dict(states)

    def reset(self) -> None:
        self.states_ = {}

    @contextlib.contextmanager
    def fork(self, name=None):
        yield


def apply() -> None:
    """Install the shims (idempotent). Only for CPU processes."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("capaware_megatron.megatron.cpu_shims is for CPU-only processes")
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = lambda: torch.device("cpu")
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _HostStream()
    token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _dtoh_on_host
    tracker = _HostRNGTracker()
    random._CUDA_RNG_STATE_TRACKER = tracker
    random.get_cuda_rng_tracker = lambda *args, **kwargs: tracker
    tensor_parallel.get_cuda_rng_tracker = random.get_cuda_rng_tracker
    _applied = True
