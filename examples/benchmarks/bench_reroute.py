"""Token Reroute in bounded rounds against the exact serial greedy: placement and perplexity.

    python examples/benchmarks/bench_reroute.py [--batches 16]

Placement: the share of what the exact serial greedy places (tests/reference.py) that the
bounded rounds place, by number of rounds, on the trained tiny GPT-MoE's real routing (its four
layers on held-out text) and on Zipf-skewed routers (skew 1.0 / 2.0; E=8 k=2 and E=64 k=8), at
gamma 1.0 / 1.5. Perplexity: the trained model (one process, every MoE layer capped over 16
windows = 2048 tokens per plan, as one EP rank of the demo sees) with drop, exact reroute and
bounded reroute. The default CapacityConfig.reroute_rounds is chosen from this table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

import torch
from timing import parse_benchmark_args
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))  # the loop reference planner
from reference import reference_plan  # noqa: E402
from tiny_moe import model as tiny  # noqa: E402

from capaware_megatron import CapacityConfig, plan_routing  # noqa: E402
from capaware_megatron.config import DEFAULT_REROUTE_ROUNDS  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402
from capaware_megatron.planner import RoutingPlan  # noqa: E402
from capaware_megatron.synthetic import skewed_routing  # noqa: E402

ROUNDS = (1, 2, 3, 4, 5, 6, 8)
GAMMAS = (1.0, 1.5)


def _exact_plan(scores, routing_map, cfg, probs=None) -> RoutingPlan:
    new_map, new_probs, capacity = reference_plan(scores, routing_map, cfg, probs=probs, exact_reroute=True)
    before, after = routing_map.sum(0), new_map.sum(0)
    rerouted = (new_map & ~routing_map).sum()
    return RoutingPlan(new_map, new_probs, capacity, before, after,
                       before.sum() - (new_map & routing_map).sum() - rerouted, rerouted)


def _placement_row(name, scores, routing_map, gamma):
    exact = int(_exact_plan(scores, routing_map, CapacityConfig(gamma, policy="reroute")).num_rerouted)
    shares = []
    for rounds in ROUNDS:
        plan = plan_routing(scores, routing_map, CapacityConfig(gamma, policy="reroute", reroute_rounds=rounds))
        shares.append(int(plan.num_rerouted) / exact if exact else 1.0)
    return name, gamma, exact, shares


def _model_rank(rank, world_size, batches, windows_per_batch):
    """Routing captured from the trained model, and its perplexity under each plan."""
    from megatron.core import parallel_state

    from capaware_megatron.megatron import cpu_shims, install

    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel()
    model = tiny.build("capaware", ep=1)
    tiny.load_checkpoint(model, ep_rank=0, ep_size=1)
    model.eval()
    data = tiny.windows(tiny.corpus("heldout", max_bytes=400_000))[: batches * windows_per_batch]
    data = data.view(batches, windows_per_batch, -1)
    dispatchers = [layer.mlp.token_dispatcher for layer in model.decoder.layers]
    routing = []

    def capture(dispatcher, routing_map, probs):
        scores = dispatcher._full_scores(probs, routing_map)
        routing.append((scores.detach().clone(), routing_map.clone(), probs.detach().clone()))
        return scores

    runs = [("dropless", CapacityConfig(None), False)]
    for gamma in GAMMAS:
        runs += [(f"drop g{gamma}", CapacityConfig(gamma), False),
                 (f"reroute exact g{gamma}", CapacityConfig(gamma, policy="reroute"), True),
                 (f"reroute {DEFAULT_REROUTE_ROUNDS} rounds g{gamma}", CapacityConfig(gamma, policy="reroute"), False)]
    nll: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in runs}  # per batch
    with torch.no_grad():
        for batch in tqdm(data, desc="perplexity", unit="batch", dynamic_ncols=True):
            for name, cfg, exact in runs:
                for dispatcher in dispatchers:
                    dispatcher.capacity_config = cfg
                    dispatcher.plan = _planner(dispatcher, exact, capture if name == "dropless" else None)
                loss = tiny.forward_loss(model, batch).double()
                nll[name].append((float(loss.sum()), loss.numel()))
    return nll, routing[: len(dispatchers)]


def perplexity(batches: list[tuple[float, int]]) -> float:
    """exp of the mean per-token NLL over all batches ((NLL sum, tokens) each)."""
    return math.exp(sum(total for total, _ in batches) / sum(count for _, count in batches))


def paired_difference(ours: list[tuple[float, int]], theirs: list[tuple[float, int]]) -> tuple[float, float]:
    """(mean, standard error) over batches of the per-token NLL difference ours - theirs: the
    same batches under both plans, so the batches' own spread cancels."""
    differences = [a / n - b / m for (a, n), (b, m) in zip(ours, theirs)]
    mean = statistics.fmean(differences)
    return mean, statistics.stdev(differences) / math.sqrt(len(differences))


def _planner(dispatcher, exact: bool, capture):
    """The dispatcher's plan step: bounded (its own), exact (the reference), or capturing."""
    own = type(dispatcher).plan.__get__(dispatcher)
    if not exact and capture is None:
        return own

    def plan(routing_map, probs):
        if capture is not None:
            capture(dispatcher, routing_map, probs)  # consumes the router logits: dropless needs none
            return own(routing_map, probs)
        scores = dispatcher._full_scores(probs, routing_map)
        result = _exact_plan(scores, routing_map, dispatcher.capacity_config, probs=probs)
        dispatcher.last_plan = result
        return result

    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--windows-per-batch", type=int, default=16)
    args = parse_benchmark_args(parser)
    nll, routing = run_gloo(_model_rank, 1, args.batches, args.windows_per_batch, timeout=1800)[0]
    workloads = [(f"trained L{i}", s.float(), m) for i, (s, m, _) in enumerate(routing)]
    for skew in (1.0, 2.0):
        for num_tokens, num_experts, topk in ((2048, 8, 2), (1024, 64, 8)):
            scores, routing_map = skewed_routing(num_tokens, num_experts, topk, skew=skew, seed=1)
            workloads.append((f"zipf {skew} E{num_experts} k{topk}", scores, routing_map))
    rows = [_placement_row(name, scores, routing_map, gamma)
            for name, scores, routing_map in tqdm(workloads, desc="placement", unit="workload", dynamic_ncols=True)
            for gamma in GAMMAS]
    print(f"Reroute placement: bounded rounds / exact serial greedy (placed assignments)\n"
          f"machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}; commit {args.commit}; command: python examples/benchmarks/bench_reroute.py "
          f"--batches {args.batches}\n")
    head = f"{'routing':<18} {'gamma':>5} {'exact':>6} " + " ".join(f"{f'R={r}':>7}" for r in ROUNDS)
    print(head + "\n" + "-" * len(head))
    for name, gamma, exact, shares in rows:
        print(f"{name:<18} {gamma:>5} {exact:>6} " + " ".join(f"{s:>7.4f}" for s in shares))
    worst = {r: min(shares[i] for *_, shares in rows) for i, r in enumerate(ROUNDS)}
    print("\nworst share: " + ", ".join(f"R={r} {w:.4f}" for r, w in worst.items()))
    print(f"\nPerplexity of the trained tiny GPT-MoE ({args.batches * args.windows_per_batch * tiny.SEQ} held-out "
          f"bytes, one plan per {args.windows_per_batch * tiny.SEQ} tokens, local scope, score priority):")
    for name, batches in nll.items():
        print(f"  {name:<28} {perplexity(batches):.5f}")
    print(f"\nBounded ({DEFAULT_REROUTE_ROUNDS} rounds) - exact, per-token NLL over the {args.batches} batches "
          "(mean +- standard error; positive: bounded worse):")
    for gamma in GAMMAS:
        mean, error = paired_difference(nll[f"reroute {DEFAULT_REROUTE_ROUNDS} rounds g{gamma}"],
                                        nll[f"reroute exact g{gamma}"])
        print(f"  g{gamma}: {mean:+.2e} +- {error:.2e} nats ({mean / error if error else 0:+.1f} standard errors)")


if __name__ == "__main__":
    main()
