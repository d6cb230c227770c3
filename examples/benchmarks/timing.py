"""Shared timing helpers of the benchmarks: median of repeats after warm-up."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn(); triton.testing.do_bench on CUDA."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 28) -> float:
    """Measured bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=5)
    return 2 * num_bytes / seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def interleaved_rounds(runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                       on_start: Callable[[str], None] = lambda name: None) -> dict[str, list[float]]:
    """{run: seconds per round} over `rounds` rounds after `warmup`, the runs interleaved within
    every round, in an order rotated from round to round (drift of the machine spreads over all
    of them). Under torch.distributed each round's time is the slowest rank's: the step waits
    for it. `on_start(name)` runs before each run (e.g. to switch a layer's configuration)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(warmup + rounds):
        # Each round starts with another run: none always follows the same neighbour (a large
        # run leaves caches and the allocator cold for whichever comes next).
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            on_start(name)
            if distributed:
                dist.barrier()
            start = time.perf_counter()
            run()
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            if distributed:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_index >= warmup:
                samples[name].append(float(elapsed))
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def parse_benchmark_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The benchmarks' common command line: adds --verbose, parses, refuses --rounds < 2 (the
    tables report quartiles), quiets the frameworks' notices; ``args.commit`` is the checkout's
    short commit (the results files name it)."""
    import subprocess

    from capaware_megatron.quiet import quiet_frameworks

    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own warnings")
    args = parser.parse_args()
    if getattr(args, "rounds", 2) < 2:
        parser.error("--rounds must be >= 2 (the table reports quartiles)")
    quiet_frameworks(args.verbose)
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip()
    return args
