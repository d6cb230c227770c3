"""MoE-layer time under expert parallelism (CPU, 2 gloo ranks): dropless vs each policy.

    python examples/benchmarks/bench_moe_layer.py [--tokens 4096] [--repeats 5]

Workloads: the trained tiny GPT-MoE's four MoE layers on held-out text (its real routing), and
one of its layers with a Zipf-skewed router (skew 0.5, 1.0, 2.0). For each: the MoE-layer time
of the slowest rank (median of repeats), the measured speedup over dropless, the ideal speedup
(max EP-rank load before / after the plan, summed over source ranks), and the planner's share
of the layer time. Then a cost-model projection to EP 8..256 (one expert per rank) from the
trained model's measured expert popularity, beside the paper's Megatron numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from tiny_moe import model as tiny  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402
from capaware_megatron.quiet import quiet_frameworks  # noqa: E402

EP = 2
GAMMAS = (2.0, 1.5, 1.0)
CONFIGS = [("dropless", CapacityConfig(None))] + [
    (f"{policy} g{gamma}", CapacityConfig(gamma, policy=policy))
    for gamma in GAMMAS for policy in ("drop", "reroute", "expanded")
]
PAPER = {  # MoE-layer speedup with token drop, Megatron-LM, 8 GPUs (paper-notes.md)
    "OLMoE": (1.21, 1.30, 1.46), "DeepSeek-V2-Lite": (1.12, 1.23, 1.37),
    "Qwen1.5-MoE": (1.10, 1.13, 1.18), "Mixtral-8x7B": (1.44, 1.89, 2.55),
}


def _capture_layer_inputs(model, windows):
    """Hidden states entering each MoE layer, [T, 1, H] per layer."""
    captured = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
             for layer in model.decoder.layers]
    with torch.no_grad():
        tiny.forward_loss(model, windows)
    for hook in hooks:
        hook.remove()
    return [h.reshape(-1, 1, h.shape[-1]) for h in captured]


def _zipf_router(layer, skew: float, hidden: torch.Tensor) -> torch.Tensor:
    """Make the layer's router Zipf-skewed: a constant input feature times a per-expert bias."""
    num_experts = layer.router.weight.shape[0]
    rank = torch.arange(1, num_experts + 1, dtype=torch.float32)
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer.router.weight[:, 0] = -skew * torch.log(rank)[perm]
    hidden = hidden.clone()
    hidden[..., 0] = 1.0
    return hidden


def _time_configs(layer, hidden, repeats):
    """{config: (slowest-rank median seconds, planning seconds, ideal speedup, loads before)}.

    Configurations are interleaved round by round, so drift of the machine (other processes,
    frequency) spreads over all of them instead of biasing the ones measured last.
    """
    dispatcher = layer.token_dispatcher
    plan = dispatcher.plan
    planning = {name: [] for name, _ in CONFIGS}
    samples = {name: [] for name, _ in CONFIGS}
    loads = {}
    current = [None]

    def timed_plan(*args, **kwargs):
        start = time.perf_counter()
        result = plan(*args, **kwargs)
        planning[current[0]].append(time.perf_counter() - start)
        return result

    dispatcher.plan = timed_plan
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, cfg in CONFIGS:
                current[0] = name
                dispatcher.capacity_config = cfg
                dist.barrier()
                start = time.perf_counter()
                layer(hidden)
                if round_ > 0:
                    samples[name].append(time.perf_counter() - start)
                last = dispatcher.last_plan
                loads[name] = torch.stack([last.tokens_per_expert_before, last.tokens_per_expert_after]).double()
    dispatcher.plan = plan
    results = {}
    for name, _ in CONFIGS:
        slowest = torch.tensor([statistics.median(samples[name]), statistics.median(planning[name][1:])])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        total = loads[name].clone()
        dist.all_reduce(total)  # what each expert receives from both ranks
        per_rank = total.view(2, EP, -1).sum(2)
        results[name] = (float(slowest[0]), float(slowest[1]), float(per_rank[0].max() / per_rank[1].max()), total[0])
    return results


def _rank_main(rank, world_size, tokens, repeats):
    from megatron.core import parallel_state

    from capaware_megatron.megatron import cpu_shims, install

    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    model = tiny.build("capaware", ep=EP)
    tiny.load_checkpoint(model, ep_rank=rank, ep_size=EP)
    model.eval()
    heldout = tiny.corpus("heldout", max_bytes=600_000)
    windows = tiny.windows(heldout)
    mine = windows[rank::world_size][: tokens // tiny.SEQ]
    inputs = _capture_layer_inputs(model, mine)
    # (name, layer, its input): a Zipf workload re-skews layer 0's router when its turn comes.
    workloads = [(f"trained L{i}", model.decoder.layers[i].mlp, lambda i=i: inputs[i]) for i in range(len(inputs))]
    zipf_layer = model.decoder.layers[0].mlp
    workloads += [(f"zipf {skew}", zipf_layer, lambda skew=skew: _zipf_router(zipf_layer, skew, inputs[0]))
                  for skew in (0.5, 1.0, 2.0)]
    results = {}
    for name, layer, make_input in tqdm(workloads, desc="MoE-layer benchmark", unit="workload",
                                        disable=rank != 0, dynamic_ncols=True):
        for config_name, measured in _time_configs(layer, make_input(), repeats).items():
            results[(name, config_name)] = measured
    return results if rank == 0 else None


def _straggler(loads: torch.Tensor) -> float:
    return float(loads.max() / loads.float().mean())


def _projection(relative_loads: torch.Tensor, tokens_per_rank: int, topk: int):
    """Projected MoE-layer speedup at EP 8..256 (one expert per rank, scope local, token drop).

    Cost model: the layer waits for its busiest rank, whose time is proportional to its load.
    Expert popularity is resampled from the trained model's measured relative loads (load / mean
    of every expert of every layer), so larger EP sees the same kind of hot experts, not a
    formula. Each source rank's k * T assignments are multinomial over the experts, capped at
    C = ceil(T * k / E * gamma) per expert on that rank (which tokens drop does not change counts).
    """
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ep in (8, 16, 32, 64, 128, 256):
        popularity = relative_loads[torch.randint(0, relative_loads.numel(), (ep,), generator=gen)]
        probs = (popularity / popularity.sum()).expand(ep, -1)
        counts = torch.stack([torch.multinomial(p, tokens_per_rank * topk, replacement=True, generator=gen)
                              .bincount(minlength=ep) for p in probs])  # [source rank, expert]
        before = counts.sum(0)
        speedups = []
        for gamma in GAMMAS:
            capacity = math.ceil(tokens_per_rank * topk / ep * gamma)
            speedups.append(float(before.max() / counts.clamp_max(capacity).sum(0).max()))
        rows.append((ep, _straggler(before), speedups))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--projection-tokens", type=int, default=1024, help="tokens per rank, projection")
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own warnings")
    args = parser.parse_args()
    quiet_frameworks(args.verbose)
    results = run_gloo(_rank_main, EP, args.tokens, args.repeats, timeout=900)[0]
    print(f"MoE-layer time, EP{EP} over gloo on CPU (1 thread per rank), {args.tokens} tokens per rank, "
          f"tiny GPT-MoE layers (H={tiny.MODEL['hidden_size']}, F={tiny.MODEL['moe_ffn_hidden_size']}, "
          f"E={tiny.MODEL['num_moe_experts']}, top-{tiny.MODEL['moe_router_topk']}); median of {args.repeats}\n")
    head = f"{'workload':<11} {'run':<14} {'ms':>8} {'measured':>9} {'ideal':>6} {'plan %':>7}"
    print(head + "\n" + "-" * len(head))
    workloads = sorted({w for w, _ in results}, key=lambda w: (w.startswith("zipf"), w))
    for workload in workloads:
        base = results[(workload, "dropless")][0]
        for config_name, _ in CONFIGS:
            seconds, planning, ideal, _ = results[(workload, config_name)]
            print(f"{workload:<11} {config_name:<14} {1e3 * seconds:>8.2f} {base / seconds:>8.2f}x "
                  f"{ideal:>5.2f}x {100 * planning / seconds:>6.1f}%")
    # Projection from the trained model's routing (its dropless per-expert loads).
    measured = torch.cat([results[(w, "dropless")][3] for w in workloads if w.startswith("trained")])
    relative = measured / measured.view(-1, tiny.MODEL["num_moe_experts"]).mean(1).repeat_interleave(
        tiny.MODEL["num_moe_experts"])
    rows = _projection(relative, args.projection_tokens, tiny.MODEL["moe_router_topk"])
    print(f"\nProjection to larger EP (cost model: layer time proportional to the busiest rank's load; "
          f"one expert per rank; scope local; {args.projection_tokens} tokens per rank; expert "
          f"popularity resampled from the trained model's relative loads, max {float(relative.max()):.2f}x mean)")
    print(f"{'EP':>4} {'straggler':>9} " + " ".join(f"{'g' + str(g):>7}" for g in GAMMAS))
    for ep, straggler, speedups in rows:
        print(f"{ep:>4} {straggler:>9.2f} " + " ".join(f"{s:>6.2f}x" for s in speedups))
    print("\nPaper (Megatron-LM, 8 GPUs, token drop, MoE-layer speedup at gamma 2.0 / 1.5 / 1.0):")
    for model_name, speedups in PAPER.items():
        print(f"  {model_name:<17} " + " / ".join(f"{s:.2f}" for s in speedups))


if __name__ == "__main__":
    main()
