"""MoE-layer time where the experts dominate: dropless vs each policy, EP2 and EP4 over gloo.

    python examples/benchmarks/bench_expert_layer.py [--tokens 1024] [--rounds 7] [--ep 2 4]

A Megatron-Core MoE layer with hidden 512 and FFN 1024 (E=8, top-2; the trained tiny model's
layers are too narrow for the experts to dominate: H 128, F 256) runs the routing of
- the trained tiny GPT-MoE's layer 0 on held-out text (its router's decisions, imposed), and
- Zipf-skewed routers (skew 1.0, 2.0),
dropless and under every policy at gamma 1.0 / 1.5 / 2.0 (scope local, score priority). Rounds
interleave the runs; a round's time is the slowest rank's; median and IQR. Beside each: the
ideal speedup (the busiest EP rank's load before / after the plan, summed over source ranks), the
measured speedup as a share of it (measured / ideal), and the plan's share of the layer time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from moe_layer import build_moe_layer  # noqa: E402
from timing import device_name, interleaved_rounds, parse_benchmark_args, quartiles  # noqa: E402
from tiny_moe import model as tiny  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402
from capaware_megatron.synthetic import skewed_routing  # noqa: E402

HIDDEN, FFN, EXPERTS, TOPK = 512, 1024, 8, 2
CONFIGS = {"dropless": CapacityConfig(None)} | {
    f"{policy} g{gamma}": CapacityConfig(gamma, policy=policy)
    for gamma in (2.0, 1.5, 1.0) for policy in ("drop", "reroute", "expanded")
}


def _capture_trained_routing(rank: int, world_size: int, tokens: int, num_ranks: int):
    """Per simulated rank: (logits, probs, routing_map) [T, E] of the trained model's layer 0 on
    that rank's own held-out windows: its router's own decisions."""
    from megatron.core import parallel_state

    from capaware_megatron.megatron import cpu_shims

    cpu_shims.apply()
    parallel_state.initialize_model_parallel()
    model = tiny.build("alltoall")
    tiny.load_checkpoint(model)
    model.eval()
    layer = model.decoder.layers[0].mlp
    captured = []
    layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    windows = tiny.windows(tiny.corpus("heldout", max_bytes=600_000))
    per_rank = -(-tokens // tiny.SEQ)
    routing = []
    with torch.no_grad():
        for source in range(num_ranks):
            captured.clear()
            tiny.forward_loss(model, windows[source * per_rank:(source + 1) * per_rank])
            hidden = captured[0].transpose(0, 1).reshape(-1, captured[0].shape[-1])[:tokens]
            logits = hidden @ layer.router.weight.t()
            probs, routing_map = layer.router.routing(logits)
            routing.append((logits, probs, routing_map))
    return routing


def _zipf_routing(tokens: int, skew: float, rank: int):
    """(logits, probs, routing_map) of a Zipf-skewed router (probs: softmax over the top-k)."""
    scores, routing_map = skewed_routing(tokens, EXPERTS, TOPK, skew=skew, seed=rank)
    logits = scores.clamp_min(1e-9).log()
    return logits, torch.where(routing_map, logits, float("-inf")).softmax(-1), routing_map


def _impose(layer, logits: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
    """The layer's router returns this routing and hands the logits to the dispatcher."""

    def forward(_hidden, padding_mask=None):
        layer.token_dispatcher.capture_router_logits(logits)
        return probs, routing_map

    layer.router.forward = forward


def _rank_main(rank: int, world_size: int, tokens: int, rounds: int, trained: list):
    from megatron.core import parallel_state

    from capaware_megatron.megatron import cpu_shims, install

    torch.set_num_threads(1)
    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size)
    workloads = {"trained L0": trained[rank],
                 "zipf 1.0": _zipf_routing(tokens, 1.0, rank), "zipf 2.0": _zipf_routing(tokens, 2.0, rank)}
    layer = build_moe_layer("capaware", world_size, HIDDEN, FFN, EXPERTS, TOPK)
    dispatcher = layer.token_dispatcher
    hidden = torch.randn(tokens, 1, HIDDEN, generator=torch.Generator().manual_seed(rank))
    plan, current, planning = dispatcher.plan, [None], {}

    def timed_plan(*args, **kwargs):
        start = time.perf_counter()
        result = plan(*args, **kwargs)
        planning[current[0]].append(time.perf_counter() - start)
        return result

    def switch(name):
        current[0] = name
        dispatcher.capacity_config = CONFIGS[name]

    dispatcher.plan = timed_plan
    results = {}
    for workload, routing in workloads.items():
        _impose(layer, *routing)
        planning.update({name: [] for name in CONFIGS})
        with torch.no_grad():
            samples = interleaved_rounds({name: lambda: layer(hidden) for name in CONFIGS}, rounds,
                                         on_start=switch)
            for name in CONFIGS:  # what each plan sends each EP rank, summed over source ranks
                switch(name)
                layer(hidden)
                last = dispatcher.last_plan
                both = torch.stack([last.tokens_per_expert_before, last.tokens_per_expert_after]).double()
                dist.all_reduce(both)
                per_rank = both.view(2, world_size, -1).sum(2)
                plan_seconds = torch.tensor(quartiles(planning[name])[1])
                dist.all_reduce(plan_seconds, op=dist.ReduceOp.MAX)
                results[(workload, name)] = (samples[name], float(plan_seconds),
                                             float(per_rank[0].max() / per_rank[1].max()))
    return results if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    args = parse_benchmark_args(parser)
    print(f"MoE layer H={HIDDEN} F={FFN} E={EXPERTS} top-{TOPK}, {args.tokens} tokens per rank, gloo on "
          f"{device_name(torch.device('cpu'))}, 1 thread per rank; {args.rounds} interleaved rounds, "
          f"slowest rank; commit {args.commit}; command: python examples/benchmarks/bench_expert_layer.py "
          f"--tokens {args.tokens} --rounds {args.rounds} --ep {' '.join(map(str, args.ep))}\n")
    head = (f"{'EP':>3} {'workload':<11} {'run':<14} {'ms median':>10} {'IQR ms':>15} {'measured':>9} "
            f"{'ideal':>6} {'of ideal':>9} {'plan %':>7}")
    print(head + "\n" + "-" * len(head))
    trained = run_gloo(_capture_trained_routing, 1, args.tokens, max(args.ep))[0]
    for ep in tqdm(args.ep, desc="expert-layer benchmark", unit="EP size", dynamic_ncols=True):
        results = run_gloo(_rank_main, ep, args.tokens, args.rounds, trained[:ep], timeout=3600)[0]
        for workload in dict.fromkeys(w for w, _ in results):
            base = quartiles(results[(workload, "dropless")][0])[1]
            for name in CONFIGS:
                seconds, plan_seconds, ideal = results[(workload, name)]
                q1, median, q3 = quartiles(seconds)
                measured = base / median
                print(f"{ep:>3} {workload:<11} {name:<14} {1e3 * median:>10.1f} {1e3 * q1:>7.1f}-{1e3 * q3:<7.1f} "
                      f"{measured:>8.2f}x {ideal:>5.2f}x {100 * measured / ideal:>8.0f}% "
                      f"{100 * plan_seconds / median:>6.1f}%")


if __name__ == "__main__":
    main()
