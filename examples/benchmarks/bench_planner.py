"""Routing-plan speed: torch planner vs Triton planner vs Megatron-Core's capacity path.

    python examples/benchmarks/bench_planner.py [--device cuda] [--rounds 15] [--csv out.csv]

Megatron-Core's path is apply_router_token_dropping (drop_policy="probs") followed by its
permute index computation, i.e. what its all-to-all dispatcher does with a capacity factor.
The ":preference-sort" row times reroute's one [T, E] row sort alone (each token's experts by
score, ties to the lower index): every reroute that proposes a token's next-best expert with room
needs that order, so its ratio to drop is a floor under reroute's. The syncs column counts the
host synchronizations of one plan. The memory floor is (scores read + plan written) / measured
copy bandwidth: the plan is the routing map (1 B) and the weights (4 B) per (token, expert),
plus the permutation indices.

A second table models the Triton planner's DRAM traffic from the plan itself (which bins
overflow, how much is dropped) and prints it against the same floor: what the kernels move
when each byte is read from DRAM once, the bound on how close to the floor they can run.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import warnings
from functools import partial

import torch
from timing import copy_bandwidth, device_name, interleaved_rounds, median_seconds, parse_benchmark_args, quartiles
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from host_sync import HostSyncRecorder  # noqa: E402

from capaware_megatron import CapacityConfig, plan_routing  # noqa: E402
from capaware_megatron.synthetic import skewed_routing  # noqa: E402

SHAPES = [("Mixtral", 8192, 8, 2), ("DeepSeek-V2-Lite", 16384, 64, 8), ("DeepSeek-V3", 16384, 256, 8)]


def _megatron_path(scores, routing_map, topk, gamma, permute=True):
    """Megatron-Core's capacity drop, then (permute) its permutation, sized on the host."""
    from megatron.core.transformer.moe import moe_utils

    def run():
        probs, new_map = moe_utils.apply_router_token_dropping(
            scores * routing_map, routing_map, topk, gamma, drop_policy="probs"
        )
        if permute:
            moe_utils.permute(scores[:, :1], new_map, probs=probs, num_out_tokens=int(new_map.sum()))

    return run


def _ours(scores, routing_map, topk, gamma, backend, policy, permute=True):
    """Our plan, then (permute) the permutation indices of what it keeps."""
    cfg = CapacityConfig(gamma, policy=policy, backend=backend)

    def run():
        plan = plan_routing(scores, routing_map, cfg, validate=False, topk=topk)
        if not permute:
            return
        if backend == "triton":
            from capaware_megatron.kernels import permutation_indices

            permutation_indices(plan.routing_map, plan.probs)
        else:
            torch.arange(scores.shape[0], device=scores.device).expand(scores.shape[1], -1).masked_select(
                plan.routing_map.T
            )

    return run


def host_syncs(run, device: torch.device) -> int:
    """Host synchronizations in one call of run: on CUDA the ones torch's sync debug mode reports,
    on CPU the ops that would synchronize on a GPU (tests/host_sync.py: value reads and ops
    whose output shape depends on the data)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(warning.message) for warning in caught)
    with HostSyncRecorder() as recorder:
        run()
    return len(recorder.ops)


def triton_traffic(routing_map: torch.Tensor, topk: int, plan) -> dict[str, int]:
    """DRAM bytes of the Triton planner + permutation for this plan (fp32 scores, probs default).

    The floor's bytes (collect reads scores and map, writes keep and weights; the permutation
    writes its index and weight per kept assignment) plus the overhead: every candidate's key
    written to its expert's list and read back for the over-full bins (K2's 8 radix passes and
    K3's pass re-read it from L2), and the 32 B sectors of keep (1 B) and weights (4 B) that the
    clears of dropped entries write. Re-reads of data written moments before (the permutation's
    walk over the map) count as L2 hits.
    """
    num_tokens, num_experts = routing_map.shape
    overfull = plan.tokens_per_expert_before >= plan.capacity
    dropped = (routing_map & ~plan.routing_map).flatten().nonzero().squeeze(1)
    sectors = sum(int(torch.unique(dropped * size // 32).numel()) for size in (1, 4))
    return {
        "floor": _floor_bytes(num_tokens, num_experts, int(plan.tokens_per_expert_after.sum())),
        "lists": 8 * num_tokens * topk + 8 * int(plan.tokens_per_expert_before[overfull].sum()),
        "clears": 32 * sectors,
    }


def print_traffic_model(shapes, gamma: float) -> None:
    print("\nTriton planner + permutation DRAM traffic, modelled from the plan (drop, score, fp32):")
    print(f"{'shape':>18} {'floor MB':>9} {'lists MB':>9} {'clears MB':>9} {'total MB':>9} {'x floor':>7}")
    for name, num_tokens, num_experts, topk in shapes:
        scores, routing_map = skewed_routing(num_tokens, num_experts, topk, skew=1.0)
        plan = plan_routing(scores, routing_map, CapacityConfig(gamma, backend="torch"), topk=topk)
        parts = triton_traffic(routing_map, topk, plan)
        total = sum(parts.values())
        print(f"{name:>18} {parts['floor'] / 1e6:>9.2f} {parts['lists'] / 1e6:>9.2f} "
              f"{parts['clears'] / 1e6:>9.2f} {total / 1e6:>9.2f} {total / parts['floor']:>7.2f}")


def _floor_bytes(num_tokens: int, num_experts: int, assignments: int) -> int:
    """Scores and map read (4 + 1 B), plan written (map 1 B, weights 4 B per (token, expert);
    index 8 B + weight 4 B per assignment of the permutation)."""
    return num_tokens * num_experts * (4 + 1 + 1 + 4) + assignments * (8 + 4)


def _time_providers(runs: dict, device: torch.device, rounds: int) -> dict[str, tuple[float, float, float]]:
    """{provider: (q1, median, q3) seconds}: on CPU the providers interleaved within every round
    (the machine's drift spreads over all of them); on CUDA triton's do_bench, one after another."""
    if device.type == "cuda":
        return {name: (median_seconds(run, device),) * 3 for name, run in runs.items()}
    samples = interleaved_rounds(runs, rounds, warmup=2)
    return {name: quartiles(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gamma", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape (CPU)")
    parser.add_argument("--csv", default=None)
    args = parse_benchmark_args(parser)
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    # Megatron-Core offers drop only; reroute rows show what placing the overflow costs.
    megatron = ["megatron"] if importlib.util.find_spec("megatron") is not None else []  # not on every GPU image
    # The preference sort is the same torch op under either backend: one row, against torch's drop.
    providers = backends + megatron + [f"{backend}:reroute" for backend in backends] + ["torch:preference-sort"]
    print(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; commit {args.commit}")
    print(f"policy drop (unless :reroute), priority score, gamma {args.gamma}; times are medians "
          f"(quartiles) of {args.rounds} rounds, the providers interleaved within each round; syncs: "
          f"host synchronizations in one plan (not the permutation after it: Megatron-Core's is sized "
          f"on the host)\n")
    print(f"{'shape':>18} {'T':>6} {'E':>4} {'k':>2} {'provider':>21} {'time ms':>9} {'(q1-q3)':>17} "
          f"{'GB/s':>6} {'x floor':>8} {'/ drop':>7} {'/ Mcore':>8} {'syncs':>6}")
    rows = []
    for name, num_tokens, num_experts, topk in tqdm(SHAPES, desc="planner benchmark", unit="shape",
                                                     dynamic_ncols=True):
        scores, routing_map = skewed_routing(num_tokens, num_experts, topk, skew=1.0)
        scores, routing_map = scores.to(device), routing_map.to(device)
        traffic = _floor_bytes(num_tokens, num_experts, num_tokens * topk)
        floor = traffic / bandwidth
        runs, syncs = {}, {}
        for provider in providers:
            backend, _, policy = provider.partition(":")
            if provider == "megatron":
                runs[provider] = _megatron_path(scores, routing_map, topk, args.gamma)
                plan_step = _megatron_path(scores, routing_map, topk, args.gamma, permute=False)
            elif policy == "preference-sort":
                runs[provider] = plan_step = partial(
                    torch.sort, scores.float(), dim=1, descending=True, stable=True)
            else:
                runs[provider] = _ours(scores, routing_map, topk, args.gamma, backend, policy or "drop")
                plan_step = _ours(scores, routing_map, topk, args.gamma, backend, policy or "drop", permute=False)
            syncs[provider] = host_syncs(plan_step, device)
        timed = _time_providers(runs, device, args.rounds)
        for provider, (q1, seconds, q3) in timed.items():
            backend = provider.partition(":")[0]
            row = dict(shape=name, T=num_tokens, E=num_experts, k=topk, provider=provider,
                       ms=seconds * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, gbps=traffic / seconds / 1e9,
                       x_floor=seconds / floor, per_drop=seconds / timed[backend][1] if backend in backends else None,
                       per_megatron=seconds / timed["megatron"][1] if "megatron" in timed else None,
                       syncs=syncs[provider], device=device_name(device), commit=args.commit)
            rows.append(row)
            ratios = "".join(f" {value:>{width}.2f}" if value is not None else f" {'':>{width}}"
                             for value, width in ((row["per_drop"], 7), (row["per_megatron"], 8)))
            tqdm.write(f"{name:>18} {num_tokens:>6} {num_experts:>4} {topk:>2} {provider:>21} "
                       f"{row['ms']:>9.3f} {f'({q1 * 1e3:.3f}-{q3 * 1e3:.3f})':>17} {row['gbps']:>6.1f} "
                       f"{row['x_floor']:>8.1f}{ratios} {row['syncs']:>6}", file=sys.stdout)
    print_traffic_model(SHAPES, args.gamma)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
