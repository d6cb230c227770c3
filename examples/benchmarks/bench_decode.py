"""CUDA-graph decode: Megatron's E/k expert padding vs capaware's capacity-sized padding.

    python examples/benchmarks/bench_decode.py [--tokens 64 256] [--ep 2 4] [--rounds 9]

Under CUDA graphs Megatron's controller switches every MoE layer to drop-and-pad with capacity
factor E/k (set_decode_expert_padding): every expert receives T rows from each source rank,
so each rank's experts compute E*T rows per decode step (E/k times the mean load) and every rank
sends E*T rows through the all-to-all. A capaware layer pads to C = min(ceil(gamma*T*k/E), T)
instead: rows and bytes shrink by T/C, which is E/(gamma*k) when gamma*T*k/E is whole.

1. Computed, per decode step and MoE layer, for Mixtral-8x7B, Qwen3-235B-A22B and DeepSeek-V3
   shapes (bf16 hidden states, dispatch direction; combine sends as much back).
2. Measured on CPU over gloo (EP 2 and 4, 1 thread per rank): a Megatron-Core MoE layer whose
   experts dominate the step (hidden 512, FFN 1024, E=8, top-2), switched with Megatron's own
   set_decode_expert_padding, stock all-to-all vs capaware (drop, score) at gamma 1.0/1.5/2.0.
   Rounds interleave the runs; each round's time is the slowest rank's; median and IQR.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

from capaware_megatron import CapacityConfig
from capaware_megatron.multiprocess import run_gloo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from moe_layer import build_moe_layer  # noqa: E402
from timing import device_name, interleaved_rounds, parse_benchmark_args, quartiles  # noqa: E402

GAMMAS = (1.0, 1.5, 2.0)
SHAPES = {  # (experts, top-k, hidden)
    "Mixtral-8x7B": (8, 2, 4096),
    "Qwen3-235B-A22B": (128, 8, 4096),
    "DeepSeek-V3": (256, 8, 7168),
}
LAYER = dict(hidden=512, ffn=1024, experts=8, topk=2)


def padded_rows(tokens: int, experts: int, topk: int, gamma: float | None) -> int:
    """Rows one rank's experts compute per decode step (= rows it sends): E * C, where C is
    T with Megatron's E/k padding (gamma None) and min(ceil(gamma*T*k/E), T) with capaware."""
    capacity = tokens if gamma is None else min(math.ceil(tokens * topk / experts * gamma), tokens)
    return experts * capacity


def _computed(tokens_per_rank: tuple[int, ...]) -> list[str]:
    lines = [f"{'model':<16} {'T':>5} {'run':<12} {'rows/rank':>10} {'a2a MB':>8} {'cut':>7} "
             f"{'E/(g*k)':>8}"]
    for name, (experts, topk, hidden) in SHAPES.items():
        for tokens in tokens_per_rank:
            stock = padded_rows(tokens, experts, topk, None)
            for gamma in (None, *GAMMAS):
                rows = padded_rows(tokens, experts, topk, gamma)
                ideal = "" if gamma is None else f"{experts / (gamma * topk):>7.2f}x"
                label = "Megatron E/k" if gamma is None else f"capaware g{gamma}"
                lines.append(f"{name:<16} {tokens:>5} {label:<12} {rows:>10} "
                             f"{rows * hidden * 2 / 2**20:>8.2f} {stock / rows:>6.2f}x {ideal:>8}")
    return lines


def _build_layer(dispatcher: str, capaware: CapacityConfig | None, ep: int):
    return build_moe_layer(dispatcher, ep, LAYER["hidden"], LAYER["ffn"], LAYER["experts"],
                           LAYER["topk"], capaware)


def _padded_for_decode(layer):
    """What the controller does before a CUDA-graph decode step."""
    from megatron.core.inference import utils as inference_utils

    inference_utils.moe_layer_cache = None  # its cache holds one model's layers
    inference_utils.set_decode_expert_padding(
        layer, True, capacity_factor=LAYER["experts"] / LAYER["topk"])
    return layer


def decode_step_samples(rank: int, world_size: int, tokens: int, rounds: int, layer_shape: dict,
                        configs: dict[str, CapacityConfig | None]):
    """(rank 0) {run: (seconds per round, rows into the rank's experts)}: one padded decode step
    of the layer per run and round, `tokens` per rank; a run's config None is Megatron's stock
    all-to-all with its E/k padding. Runs inside a gloo rank (run_gloo)."""
    from megatron.core import parallel_state
    from megatron.core.inference.utils import InferenceMode

    from capaware_megatron.megatron import cpu_shims, install

    LAYER.update(layer_shape)
    torch.set_num_threads(1)
    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    runs = {name: _padded_for_decode(_build_layer("alltoall" if cfg is None else "capaware", cfg, world_size))
            for name, cfg in configs.items()}
    rows = {}
    for name, layer in runs.items():
        layer.experts.register_forward_pre_hook(
            lambda _m, args, name=name: rows.__setitem__(name, args[0].shape[0]))
    generator = torch.Generator().manual_seed(rank)
    hidden = [torch.randn(tokens, 1, LAYER["hidden"], generator=generator) for _ in range(rounds + 2)]
    step = {name: iter(hidden) for name in runs}  # a new batch every round, the same for every run
    with torch.no_grad(), InferenceMode.active():
        samples = interleaved_rounds(
            {name: lambda layer=layer, name=name: layer(next(step[name])) for name, layer in runs.items()},
            rounds, warmup=2)
    return {name: (samples[name], rows[name]) for name in runs} if rank == 0 else None


def _measured(token_counts: tuple[int, ...], rounds: int, eps: tuple[int, ...]) -> list[str]:
    lines = [f"{'T':>4} {'EP':>3} {'run':<14} {'rows/rank':>9} {'ms median':>10} {'IQR ms':>14} "
             f"{'rows cut':>9} {'time cut':>9} {'of rows':>8}"]
    settings = [(tokens, ep) for tokens in token_counts for ep in eps]
    for tokens, ep in tqdm(settings, desc="decode benchmark", unit="setting", dynamic_ncols=True):
        configs = {"Megatron E/k": None, **{f"capaware g{gamma}": CapacityConfig(gamma) for gamma in GAMMAS}}
        results = run_gloo(decode_step_samples, ep, tokens, rounds, dict(LAYER), configs, timeout=1200)[0]
        base_rows, base_time = results["Megatron E/k"][1], quartiles(results["Megatron E/k"][0])[1]
        for name, (seconds, rows) in results.items():
            q1, median, q3 = quartiles(seconds)
            rows_cut, time_cut = base_rows / rows, base_time / median
            lines.append(f"{tokens:>4} {ep:>3} {name:<14} {rows:>9} {1e3 * median:>10.2f} "
                         f"{1e3 * q1:>6.2f}-{1e3 * q3:<7.2f} {rows_cut:>8.2f}x {time_cut:>8.2f}x "
                         f"{100 * time_cut / rows_cut:>7.0f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256],
                        help="decode tokens per EP rank (one per sequence)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--hidden", type=int, default=LAYER["hidden"])
    parser.add_argument("--ffn", type=int, default=LAYER["ffn"])
    args = parse_benchmark_args(parser)
    LAYER.update(hidden=args.hidden, ffn=args.ffn)
    print(f"CUDA-graph decode, Megatron's E/k padding vs capaware; commit {args.commit}; command: "
          f"python examples/benchmarks/bench_decode.py --tokens {' '.join(map(str, args.tokens))} "
          f"--rounds {args.rounds} "
          f"--ep {' '.join(map(str, args.ep))} --hidden {args.hidden} --ffn {args.ffn}\n")
    print("1. Computed per decode step and MoE layer (rows a rank's experts compute = rows it sends; "
          "bf16 hidden states)")
    print("\n".join(_computed(tuple(args.tokens))))
    print(f"\n2. Measured: Megatron-Core MoE layer (H={LAYER['hidden']}, F={LAYER['ffn']}, "
          f"E={LAYER['experts']}, top-{LAYER['topk']}), T decode tokens per rank, gloo on "
          f"{device_name(torch.device('cpu'))}, 1 thread per rank; {args.rounds} interleaved rounds; "
          "'of rows': time cut / rows cut (target >= 70%)")
    print("\n".join(_measured(tuple(args.tokens), args.rounds, tuple(args.ep))))


if __name__ == "__main__":
    main()
