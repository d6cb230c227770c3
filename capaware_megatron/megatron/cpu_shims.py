"""CPU shims for Megatron-Core 0.19 under torch.distributed gloo: tests and the CPU demo only.

Megatron-Core assumes CUDA in a few places that do not change what it computes:
- the all-to-all dispatcher creates a torch.cuda.Stream and moves split sizes to the host on it;
- communication helpers allocate outputs on torch.cuda.current_device();
- the expert-tensor-parallel path gathers / reduce-scatters uneven splits with the list forms of
  all_gather / reduce_scatter, which gloo rejects;
- the model-parallel RNG tracker forks CUDA generator states.
Megatron-LM's training loop (`megatron.training.pretrain`) needs more: `apply_training_loop()`.
Each shim replaces the CUDA-only step by its CPU equivalent. The GPU path never imports this
module; both functions refuse to run when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from ._compat import patch_typing_override

_applied = False
_loop_applied = False


class _HostStream:
    """Stands in for torch.cuda.Stream: work on the host is already ordered."""

    def wait_stream(self, _stream) -> None:
        pass

    def record_event(self):
        return _HostEvent()


class _HostEvent:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record(self, *_: Any) -> None:
        pass

    def wait(self, *_: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, _other: Any) -> float:
        return 0.0


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


def _refuse_cuda() -> None:
    if torch.cuda.is_available():
        raise RuntimeError("capaware_megatron.megatron.cpu_shims is for CPU-only processes")


def apply() -> None:
    """Install the shims a Megatron-Core model needs on CPU (idempotent). Only for CPU processes."""
    global _applied
    if _applied:
        return
    _refuse_cuda()
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


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class _CudaPlacementOnHost(TorchFunctionMode):
    """Every tensor Megatron-LM's loop places on CUDA (``device='cuda'``, ``.cuda()``,
    ``.to('cuda')``, ``pin_memory()``) stays on the host; nothing else changes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(arg) else arg for arg in args)
        return func(*args, **kwargs)


def _cpu_rng_state(*_: Any, **__: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _no_op(*_: Any, **__: Any) -> None:
    return None


def _zero(*_: Any, **__: Any) -> int:
    return 0


def apply_training_loop() -> None:
    """Install what Megatron-LM's own loop (``megatron.training.pretrain``: initialisation,
    data loaders, optimizer, timers, evaluation, checkpoints) needs on CPU with gloo, on top of
    `apply()` (idempotent; CPU processes only). Flags do the rest: ``--clip-grad 0.0``,
    ``--no-load-rng`` when loading, ``--no-persist-layer-norm``, ``--disable-bias-linear``."""
    global _loop_applied
    if _loop_applied:
        return
    _refuse_cuda()
    patch_typing_override()  # megatron.training needs it on Python 3.11
    apply()
    import megatron.training
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import initialize, training

    # CUDA streams, events, device selection and memory statistics: host work is ordered.
    for name, value in {
        "Stream": _HostStream, "Event": _HostEvent, "current_stream": _HostStream,
        "stream": lambda *_: contextlib.nullcontext(), "synchronize": _no_op,
        "set_device": _no_op, "empty_cache": _no_op, "reset_peak_memory_stats": _no_op,
        "memory_allocated": _zero, "max_memory_allocated": _zero, "memory_reserved": _zero,
        "max_memory_reserved": _zero, "memory_stats": lambda *_: {},
        # Checkpoints store a CUDA generator state: the host generator's stands in.
        "get_rng_state": _cpu_rng_state, "set_rng_state": _no_op,
    }.items():
        setattr(torch.cuda, name, value)
    # Megatron asserts CUDA unless told this is a CPU run.
    initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    for module in (initialize, training, megatron.training):  # inference scripts import it too
        module.initialize_megatron = initialize_megatron
    # Argument validation under TP or CP reads the CUDA device's architecture (for performance
    # notes about CUDA connection settings): no device, no architecture.
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0
    # Model-parallel groups are only built when a device is counted.
    initialize._initialize_distributed = _counting_one_device(initialize._initialize_distributed)
    # The wheel ships the dataset helpers built and no Makefile to rebuild them.
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        dataset_utils.compile_helpers = _no_op
    _CudaPlacementOnHost().__enter__()
    _loop_applied = True


def _counting_one_device(function: Any) -> Any:
    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    return wrapped
