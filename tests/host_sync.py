"""Finds, on CPU, every op that would copy device data to the host on a GPU (a stream stall, and
an error inside CUDA-graph capture): reading a value (.item(), int(t), bool(t), .tolist(),
.numpy(), .cpu()) and the ops whose output shape depends on the data (nonzero, boolean-mask
indexing, masked_select, unique, bincount, repeat_interleave with tensor repeats).

    with HostSyncRecorder() as syncs:
        plan_routing(...)
    assert syncs.ops == []
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_DATA_DEPENDENT = {
    aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten.bincount,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.argwhere,
}
_DATA_DEPENDENT.discard(aten.nonzero_static)  # static output size: no sync
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
          torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _DATA_DEPENDENT:
            self.record(str(packet))
        elif packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and (
            len(args) > 1 and isinstance(args[1], torch.Tensor) or args[0].dtype != torch.bool and len(args) == 1
        ):
            self.record("repeat_interleave(tensor repeats)")
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args):
            self.record(f"{packet} with a boolean mask")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class HostSyncRecorder:
    """Context manager collecting ``ops``: one entry (op, where in our code) per host sync."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []

    def _record(self, op: str) -> None:
        stack = traceback.extract_stack()
        if any("triton/runtime/interpreter" in f.filename for f in stack):
            return  # the interpreter standing in for the GPU reads kernel arguments on the host
        frames = [f for f in stack if "capaware_megatron" in f.filename or "/kernels/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        self.ops.append((op, where))

    def __enter__(self) -> "HostSyncRecorder":
        self._modes = [_Function(self._record), _Dispatch(self._record)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
