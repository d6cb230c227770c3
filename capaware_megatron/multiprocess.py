"""Run a function on N gloo processes on this machine and return what each rank returned.

Used by the CPU demo, the CPU benchmarks and every distributed test: torch.distributed with gloo
stands in for a multi-GPU job on a machine without GPUs.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from queue import Empty
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .quiet import quiet_if_asked


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, port, queue, args, env):
    os.environ.update(env)
    # What torchrun sets: some frameworks (DeepSpeed) read it.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    quiet_if_asked()
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Without a barrier, runs with autograd collectives sometimes abort at exit.
        dist.barrier()
        dist.destroy_process_group()
        # Serialised to bytes: tensors sent as shared memory die with the process that made them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, None, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put((rank, traceback.format_exc(), None))


def _next_report(queue, procs, deadline: float):
    """The next rank's report; fails fast when a rank died without reporting (a crash in C++)."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                reason = f"exit codes {dead}" if dead else "timeout"
                raise RuntimeError(
                    f"distributed run failed: a rank ended without a result ({reason})"
                ) from None


def run_gloo(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results in rank order.

    fn must be a module-level function (spawned processes import it by name).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, queue, args, env or {}))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: list[Any] = [None] * world_size
    errors = []
    try:
        deadline = time.monotonic() + timeout
        for _ in range(world_size):
            rank, error, result = _next_report(queue, procs, deadline)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            if result is not None:
                results[rank] = torch.load(io.BytesIO(result), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return results
