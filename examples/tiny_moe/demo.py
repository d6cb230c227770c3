"""The main job: capacity-aware inference of a trained GPT-MoE under expert parallelism (CPU).

    python examples/tiny_moe/demo.py [--batches 6] [--windows-per-batch 16] [--out out/demo]

Two gloo processes hold 4 experts each (EP2). Held-out standard-library source runs through the
trained model dropless and under Token Drop, Token Reroute and Expanded Drop at gamma 2.0, 1.5,
1.0 (and other drop priorities). Prints perplexity, dropped / rerouted fractions, straggler
factors before / after (per expert and per EP rank), the MoE-layer time of the slowest rank, the
measured and the projected speedup; writes figures (per-expert load heatmap and bars, quality vs
speedup), demo.json and an offline W&B run under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_moe import model as tiny  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402

EP = 2
RUNS = [("dropless", CapacityConfig(None))] + [
    (f"{policy} g{gamma}", CapacityConfig(gamma, policy=policy))
    for gamma in (2.0, 1.5, 1.0)
    for policy in ("drop", "reroute", "expanded")
] + [
    (f"drop-{priority} g{gamma}", CapacityConfig(gamma, priority=priority))
    for gamma in (1.5, 1.0)
    for priority in ("random", "position", "reverse")
]


class _KeepLoads:
    """A tracker sink keeping the last report's per-expert loads."""

    loads = None

    def log(self, metrics, step, loads) -> None:
        self.loads = {k: v.tolist() for k, v in loads.items()}


class _LayerTimer:
    """Wall time spent inside MoE layers (forward pre/post hooks)."""

    def __init__(self, layers) -> None:
        self.total = 0.0
        for layer in layers:
            layer.register_forward_pre_hook(self._start)
            layer.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t0


class _Routed:
    """Hands plans to the LoadTracker of the run being measured (runs are interleaved)."""

    tracker = None

    def record(self, layer: int, plan) -> None:
        self.tracker.record(layer, plan)


def _rank_main(rank: int, world_size: int, batches: int, windows_per_batch: int):
    from megatron.core import parallel_state

    from capaware_megatron.megatron import attach_megatron, cpu_shims, install
    from capaware_megatron.monitor import LoadTracker

    cpu_shims.apply()
    install()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    model = tiny.build("capaware", ep=EP)
    meta = tiny.load_checkpoint(model, ep_rank=rank, ep_size=EP)
    model.eval()
    layers = [layer.mlp for layer in model.decoder.layers]
    timer = _LayerTimer(layers)
    num_experts = tiny.MODEL["num_moe_experts"]
    expert_to_rank = _expert_to_rank()
    keep = {name: _KeepLoads() for name, _ in RUNS}
    trackers = {name: LoadTracker(len(layers), num_experts, expert_to_rank, interval=0,
                                  sinks=[keep[name]], per_expert=True) for name, _ in RUNS}
    routed = _Routed()
    attach_megatron(model, routed)

    heldout = tiny.corpus("heldout", max_bytes=400_000)
    windows = tiny.windows(heldout)
    mine = windows[rank::world_size][: batches * windows_per_batch].view(batches, windows_per_batch, -1)

    # Runs are interleaved batch by batch, and each batch starts with a different run, so neither
    # drift of the machine nor the cost of coming first lands on one run.
    progress = tqdm(total=len(mine), desc="demo runs", unit="batch", disable=rank != 0, dynamic_ncols=True)
    seconds = {name: 0.0 for name, _ in RUNS}
    nll = {name: torch.zeros(2, dtype=torch.float64) for name, _ in RUNS}
    with torch.no_grad():
        for step, batch in enumerate([mine[0][:2], *mine]):  # the first pass warms up
            for name, cfg in RUNS[step % len(RUNS):] + RUNS[: step % len(RUNS)]:
                for layer in layers:
                    layer.token_dispatcher.capacity_config = cfg
                routed.tracker = trackers[name]
                dist.barrier()
                start = timer.total
                loss = tiny.forward_loss(model, batch)
                trackers[name].step()
                if step == 0:
                    trackers[name].flush(0)  # the warm-up's counts go nowhere
                    continue
                seconds[name] += timer.total - start
                nll[name] += torch.tensor([float(loss.double().sum()), loss.numel()], dtype=torch.float64)
            if step:
                progress.update()
    progress.close()

    rows = []
    for index, (name, cfg) in enumerate(RUNS):
        metrics = trackers[name].flush(index + 1)
        dist.all_reduce(nll[name])
        slowest = torch.tensor([seconds[name]])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            rows.append(dict(name=name, policy=cfg.policy, gamma=cfg.capacity_factor, priority=cfg.priority,
                             perplexity=math.exp(float(nll[name][0] / nll[name][1])),
                             moe_seconds=float(slowest), metrics=metrics, loads=keep[name].loads))
    if rank == 0:
        return rows, meta
    return None


def _table(rows) -> str:
    base = rows[0]["moe_seconds"]
    head = (f"{'run':<20} {'ppl':>6} {'drop%':>6} {'rert%':>6} {'strag/exp':>11} {'strag/rank':>11} "
            f"{'MoE s':>7} {'speedup':>8} {'projected':>9}")
    lines = [head, "-" * len(head)]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"{row['name']:<20} {row['perplexity']:>6.3f} {100 * m['capaware/dropped_fraction']:>6.1f} "
            f"{100 * m['capaware/rerouted_fraction']:>6.1f} "
            f"{m['capaware/straggler_expert_before']:>5.2f}>{m['capaware/straggler_expert_after']:<5.2f} "
            f"{m['capaware/straggler_rank_before']:>5.2f}>{m['capaware/straggler_rank_after']:<5.2f} "
            f"{row['moe_seconds']:>7.3f} {base / row['moe_seconds']:>7.2f}x {m['capaware/speedup_rank']:>8.2f}x"
        )
    return "\n".join(lines)


TABLE_COLUMNS = ["run", "policy", "gamma", "priority", "perplexity", "dropped_fraction", "rerouted_fraction",
                 "straggler_expert_before", "straggler_expert_after", "straggler_rank_before",
                 "straggler_rank_after", "moe_seconds_slowest_rank", "measured_speedup", "projected_speedup"]


def _table_rows(rows) -> list[list]:
    """The demo's runs as TABLE_COLUMNS rows (the printed table, unrounded)."""
    base = rows[0]["moe_seconds"]
    out = []
    for row in rows:
        m = row["metrics"]
        out.append([row["name"], row["policy"], row["gamma"], row["priority"], row["perplexity"],
                    m["capaware/dropped_fraction"], m["capaware/rerouted_fraction"],
                    m["capaware/straggler_expert_before"], m["capaware/straggler_expert_after"],
                    m["capaware/straggler_rank_before"], m["capaware/straggler_rank_after"],
                    row["moe_seconds"], base / row["moe_seconds"], m["capaware/speedup_rank"]])
    return out


def _write_wandb(rows, figures_by_key, out: str) -> str:
    """One offline W&B run: a step per configuration, the runs as a Table, the figures as Images."""
    from capaware_megatron.monitor import WandbSink

    os.environ.setdefault("WANDB_SILENT", "true")  # the table above is the demo's output
    sink = WandbSink(project="capaware-demo", mode="offline", dir=out, name="tiny-moe-ep2",
                     expert_to_rank=_expert_to_rank())
    for step, row in enumerate(rows):
        sink.log({**row["metrics"], "demo/perplexity": row["perplexity"],
                  "demo/moe_seconds_slowest_rank": row["moe_seconds"]}, step, None)
    try:
        import wandb

        from capaware_megatron import figures

        images = {key: wandb.Image(figures.to_rgb(figure), caption=caption)
                  for key, (figure, caption) in figures_by_key.items()}
        sink.run.log({"demo/runs": wandb.Table(columns=TABLE_COLUMNS, data=_table_rows(rows)), **images})
        sink.finish()
        wandb.teardown()
        return os.path.dirname(sink.run.dir) if hasattr(sink.run, "dir") else out
    except Exception as err:  # noqa: BLE001 - the demo goes on without W&B
        print(f"(W&B run not written: {err})")
        return ""


def _expert_to_rank() -> torch.Tensor:
    num_experts = tiny.MODEL["num_moe_experts"]
    return torch.arange(num_experts) // (num_experts // EP)


def _figures(rows, run: str = "drop g1.0") -> dict:
    """{W&B key: (figure, caption)}: the load heatmap and bars of one run, quality vs speedup."""
    from capaware_megatron import figures

    chosen = next(row for row in rows if row["name"] == run)
    loads = {stage: torch.tensor(value) for stage, value in chosen["loads"].items()}
    title = f"{chosen['policy']}, γ {chosen['gamma']:g}, {chosen['priority']} priority, local scope, EP{EP}"
    capacity = chosen["metrics"]["capaware/layer_0/capacity"]  # local scope: each source rank's C
    base = rows[0]["moe_seconds"]
    points = [figures.QualityPoint(row["name"], row["policy"], row["gamma"], row["perplexity"],
                                   row["metrics"]["capaware/speedup_rank"], base / row["moe_seconds"])
              for row in rows if row["priority"] == "score"]
    return {
        "demo/expert_load": (figures.load_heatmap(loads["before"], loads["after"], _expert_to_rank(),
                                                  f"tokens per expert / mean: {title}"),
                             "layers x experts, load / mean load, router vs plan"),
        "demo/expert_load_layer0": (figures.expert_load_bars(
            loads["before"][0], loads["after"][0], _expert_to_rank(), EP * capacity,
            f"layer 0, tokens per step from both source ranks: {title}",
            f"cap: C = {capacity:g} per source rank x {EP}"),
            "tokens per expert of layer 0, router vs plan, with the capacity"),
        "demo/quality_vs_speedup": (figures.quality_vs_speedup(
            points, f"tiny GPT-MoE, EP{EP}, score priority: perplexity vs speedup"),
            "perplexity against projected and measured MoE-layer speedup, per policy and gamma"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--windows-per-batch", type=int, default=16)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own warnings")
    args = parser.parse_args(argv)
    from capaware_megatron.quiet import quiet_frameworks

    quiet_frameworks(args.verbose)
    if not os.path.exists(os.path.join(tiny.CHECKPOINT, "model.pt")):
        raise SystemExit(f"no checkpoint in {tiny.CHECKPOINT}: run examples/tiny_moe/train.py first")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    rows, meta = run_gloo(_rank_main, EP, args.batches, args.windows_per_batch, timeout=600)[0]
    tokens = EP * args.batches * args.windows_per_batch * tiny.SEQ
    print(f"\nTiny GPT-MoE ({meta['model']['num_layers']} layers, {meta['model']['num_moe_experts']} experts, "
          f"top-{meta['model']['moe_router_topk']}; trained {meta['steps']} steps, seed {meta['seed']}), "
          f"EP{EP} over gloo, {tokens} held-out bytes of the Python {sys.version.split()[0]} stdlib per run\n")
    print(_table(rows))
    print("\nppl: perplexity per byte; strag: max/mean load before>after the plan (per expert, per EP "
          "rank); MoE s: time in MoE layers of the slowest rank; speedup: dropless MoE s / this run's; "
          "projected: max EP-rank load before / after.")
    with open(os.path.join(args.out, "demo.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    written = [os.path.join(args.out, "demo.json")]
    from capaware_megatron import figures

    figures_by_key = _figures(rows)
    for key, (figure, _) in figures_by_key.items():
        written.append(figures.save(figure, os.path.join(args.out, key.split("/")[1] + ".png")))
    run_dir = _write_wandb(rows, figures_by_key, args.out)
    print(f"\nwrote {', '.join(written)}" + (f", W&B offline run {run_dir}" if run_dir else ""))
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
