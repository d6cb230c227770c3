"""Planner demo on synthetic skewed routing: expert load before and after each policy.

    python -m capaware_megatron.demo [--tokens 8192 --experts 8 --topk 2 --skew 1.0]
"""

from __future__ import annotations

import argparse

import torch

from .config import CapacityConfig
from .planner import plan_routing
from .stats import plan_stats
from .synthetic import skewed_routing


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--experts-per-rank", type=int, default=2)
    parser.add_argument("--skew", type=float, default=1.0)
    args = parser.parse_args(argv)

    scores, routing_map = skewed_routing(args.tokens, args.experts, args.topk, skew=args.skew)
    expert_to_rank = torch.arange(args.experts) // args.experts_per_rank
    local = (expert_to_rank == 0).nonzero().flatten()  # the demo plays EP rank 0
    print(
        f"Synthetic routing: T={args.tokens} tokens, E={args.experts} experts, top-{args.topk}, "
        f"{args.experts_per_rank} experts per EP rank, skew {args.skew}\n"
    )
    headers = ["policy", "gamma", "scope", "C", "max load", "straggler/exp", "straggler/rank",
               "dropped %", "rerouted %", "speedup"]
    widths = [max(len(h), 8) for h in headers]
    print(_row(headers, widths))
    runs = [(CapacityConfig(None), "dropless")] + [
        (CapacityConfig(gamma, policy=policy, scope=scope), policy)
        for gamma in (2.0, 1.5, 1.0)
        for policy, scope in [("drop", "local"), ("reroute", "local"), ("expanded", "local"),
                              ("drop", "device")]
    ]
    for cfg, name in runs:
        plan = plan_routing(
            scores, routing_map, cfg, local_experts=local, expert_to_rank=expert_to_rank
        )
        stats = plan_stats(plan, expert_to_rank)
        speedup = stats.speedup_rank if cfg.scope == "device" else stats.speedup_expert
        print(_row([
            name,
            "-" if cfg.capacity_factor is None else f"{cfg.capacity_factor:.1f}",
            cfg.scope,
            str(plan.capacity),
            str(int(plan.tokens_per_expert_after.max())),
            f"{float(stats.straggler_expert_after):.2f}",
            f"{float(stats.straggler_rank_after):.2f}",
            f"{100 * float(stats.dropped_fraction):.1f}",
            f"{100 * float(stats.rerouted_fraction):.1f}",
            f"{float(speedup):.2f}x",
        ], widths))
    print(
        "\nstraggler = max/mean load (per expert, per EP rank); speedup = max load before/after "
        "(the projected MoE-layer speedup when it waits for its busiest expert or rank)."
    )


if __name__ == "__main__":
    main()
