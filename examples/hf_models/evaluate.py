"""Capacity-aware inference of a Hugging Face MoE checkpoint in Megatron-Core: perplexity, greedy
generation and expert load over a gamma sweep, through Megatron-LM's own arguments.

    torchrun --nproc-per-node 8 -m capaware_megatron.megatron.run examples/hf_models/evaluate.py \
        --hf-path /models/Qwen3-30B-A3B --text heldout.txt --expert-model-parallel-size 8 --bf16 \
        --moe-token-dispatcher capaware --seq-length 2048 --micro-batch-size 4 --out out/qwen3

launch/hf_models.sh adds what a CPU needs. The model's shape comes from --hf-path's config.json
(Megatron's model flags default to it and must agree with it); its weights from the safetensors
files, or from --load (a Megatron checkpoint: one this script wrote with --save, or Megatron-LM's
convert_model.py). Megatron's parallel flags (--tensor-model-parallel-size,
--expert-model-parallel-size, --expert-tensor-parallel-size, --pipeline-model-parallel-size; data
parallelism is what is left) spread it; perplexity runs through Megatron's forward-only schedule,
and under PP > 1 generation and lm-eval too, so pipeline stages pass activations. Each run
(dropless, then every --capaware-sweep-policies x --capaware-sweep-gammas, the other --capaware-*
flags shared) measures held-out perplexity on --text (default: a short text shipped here),
generates greedily from --prompt, and records every capaware layer's plan. The last
rank prints the quality table and writes, under --out: quality.md, results.json, load.png (layers x
experts, router vs plan, of the most capped drop run) and quality_vs_speedup.png; with
--lm-eval-tasks each run also scores lm-evaluation-harness tasks. Megatron's --tensorboard-dir and
--wandb-project receive the runs' load statistics.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TEXT = os.path.join(HERE, "sample.txt")
DEFAULT_PROMPTS = ["Alice was beginning to get very tired of", "Down, down, down. Would the fall"]

if not torch.cuda.is_available():
    from capaware_megatron.megatron import cpu_shims

    cpu_shims.apply_training_loop()

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.training import get_args, get_tokenizer, initialize_megatron, print_rank_last  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.config import POLICIES  # noqa: E402
from capaware_megatron.hf import CheckpointError, inspect_checkpoint  # noqa: E402
from capaware_megatron.hf.evaluation import (  # noqa: E402
    data_parallel_share, greedy_generate, set_capacity, sum_nll, token_windows)
from capaware_megatron.megatron import attach_megatron, capacity_config_from_args  # noqa: E402
from capaware_megatron.monitor import LoadTracker  # noqa: E402
from capaware_megatron.monitor.sinks import megatron_sinks  # noqa: E402


def add_hf_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="Hugging Face checkpoint, capacity-aware sweep")
    group.add_argument("--hf-path", required=True,
                       help="Hugging Face checkpoint folder: config.json, tokenizer, safetensors "
                            "weights (not read with --load).")
    group.add_argument("--text", default=SAMPLE_TEXT, help="Held-out text file (default: sample.txt).")
    group.add_argument("--max-windows", type=int, default=None,
                       help="At most this many --seq-length windows of --text (default: all).")
    group.add_argument("--prompt", action="append", default=None,
                       help="A greedy-generation prompt (repeatable; default: two from sample.txt).")
    group.add_argument("--num-tokens-to-generate", type=int, default=24)
    group.add_argument("--capaware-sweep-gammas", type=float, nargs="*", default=[2.0, 1.5, 1.0],
                       help="Capacity factors of the sweep (a dropless run comes first; none: "
                            "dropless only).")
    group.add_argument("--capaware-sweep-policies", nargs="+", default=["drop", "reroute", "expanded"],
                       choices=[p for p in POLICIES if p != "none"])
    group.add_argument("--lm-eval-tasks", nargs="+", default=None,
                       help="lm-evaluation-harness tasks scored in every run (extra lm-eval).")
    group.add_argument("--lm-eval-include-path", default=None, help="A folder of task YAMLs of your own.")
    group.add_argument("--lm-eval-limit", type=float, default=None, help="Examples per task (lm-eval --limit).")
    group.add_argument("--out", default="out/hf_models", help="Folder of the table, figures and JSON.")
    return parser


# Megatron's model flags: taken from the checkpoint; one given on the command line must agree.
SHAPE_FLAGS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_experts": "num_moe_experts",
    "moe_router_topk": "moe_router_topk",
}


def _checkpoint_from_argv(argv):
    """The --hf-path checkpoint, checked before Megatron starts (no process group, no weights)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--hf-path")
    pre.add_argument("--load")
    known, _ = pre.parse_known_args(argv)
    if known.hf_path is None:
        raise SystemExit("evaluate.py: --hf-path is required (the checkpoint's config and tokenizer)")
    try:
        return inspect_checkpoint(known.hf_path, require_weights=known.load is None)
    except CheckpointError as err:
        raise SystemExit(f"evaluate.py: {err}") from None


def _shape(checkpoint) -> dict:
    """{Megatron argument: the checkpoint's value}."""
    fields = checkpoint.transformer_fields
    return {**{flag: fields[name] for flag, name in SHAPE_FLAGS.items()},
            "max_position_embeddings": checkpoint.max_position_embeddings}


def with_checkpoint_shape(argv: list, checkpoint) -> list:
    """`argv` with the checkpoint's model flags added where absent (Megatron then validates the
    checkpoint's shape); a flag given that disagrees is refused, naming it."""
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    added = []
    for flag, value in _shape(checkpoint).items():
        option = "--" + flag.replace("_", "-")
        if option not in given:
            added += [option, str(value)]
            continue
        at = next(i for i, arg in enumerate(argv) if arg.split("=")[0] == option)
        text = argv[at].split("=", 1)[1] if "=" in argv[at] else argv[at + 1]
        if int(text) != value:
            raise SystemExit(f"evaluate.py: {option} {text} disagrees with the checkpoint's {value} "
                             f"({checkpoint.path}/config.json); leave it out")
    return [*argv, *added]


def _megatron_defaults(checkpoint) -> dict:
    return dict(seq_length=min(checkpoint.max_position_embeddings, 2048),
                tokenizer_type="HuggingFaceTokenizer", tokenizer_model=checkpoint.path,
                micro_batch_size=1, no_load_rng=True, no_load_optim=True, save_interval=1)


def _check_supported(args, checkpoint) -> None:
    if args.seq_length > checkpoint.max_position_embeddings:
        raise SystemExit(f"evaluate.py: --seq-length {args.seq_length} exceeds the checkpoint's "
                         f"max_position_embeddings {checkpoint.max_position_embeddings}")
    if args.moe_token_dispatcher_type != "capaware":
        raise SystemExit("evaluate.py: needs --moe-token-dispatcher capaware (the sweep switches "
                         f"its capacity), got {args.moe_token_dispatcher_type!r}")


def _runs(args) -> list:
    """(name, CapacityConfig): dropless first, then each policy x gamma; other knobs from --capaware-*."""
    base = capacity_config_from_args(args)
    runs = [("dropless", dataclasses.replace(base, capacity_factor=None, policy=None,
                                             decode_capacity_factor=None))]
    for policy in args.capaware_sweep_policies:
        for gamma in args.capaware_sweep_gammas:
            runs.append((f"{policy} g{gamma:g}", dataclasses.replace(
                base, capacity_factor=gamma, policy=policy, decode_capacity_factor=None)))
    return runs


def _build(checkpoint, args):
    from capaware_megatron.hf import build_model

    model = build_model(checkpoint, CapacityConfig(None), dtype=args.params_dtype,
                        import_weights=args.load is None, sequence_parallel=args.sequence_parallel)
    if args.load is not None:
        from megatron.training.checkpointing import load_checkpoint

        load_checkpoint([model], None, None, strict=True)
    if args.save is not None:
        _save(model, args, checkpoint)
    return model


def _save(model, args, checkpoint) -> None:
    """A Megatron checkpoint of the imported weights (Megatron's own format: --load it at any TP
    / EP), with the HF config and tokenizer files next to it."""
    from megatron.training.checkpointing import save_checkpoint

    save_checkpoint(1, [model], None, None, 0)
    if dist.get_rank() == 0:
        hf_dir = os.path.join(args.save, "hf_config")
        os.makedirs(hf_dir, exist_ok=True)
        for name in os.listdir(checkpoint.path):
            if name.endswith((".json", ".txt", ".model", ".jinja")) and "safetensors" not in name:
                shutil.copy(os.path.join(checkpoint.path, name), hf_dir)
    print_rank_last(f"saved a Megatron checkpoint to {args.save} (config, tokenizer: {args.save}/hf_config)")


def _timed(function, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


class _KeepLoads:
    """A tracker sink keeping the last report's per-expert loads."""

    loads = None

    def log(self, metrics, step, loads) -> None:
        if loads:
            self.loads = {stage: value.tolist() for stage, value in loads.items()}


def _lm_eval(model, tokenizer, args) -> dict:
    from capaware_megatron.lm_eval import evaluate_tasks

    return evaluate_tasks(model, tokenizer, args.lm_eval_tasks, max_length=args.seq_length,
                          batch_size=args.micro_batch_size, include_path=args.lm_eval_include_path,
                          limit=args.lm_eval_limit)


class _Recorder:
    """Hands every capaware layer's plan to the tracker of the run being measured (none between)."""

    tracker = None

    def record(self, layer: int, plan) -> None:
        if self.tracker is not None:
            self.tracker.record(layer, plan)


def sweep(model, args, windows, prompts) -> list:
    """Every run's row (on the last rank, where Megatron's writers live; None elsewhere). Load
    statistics count the perplexity forwards only."""
    tokenizer = get_tokenizer()
    num_experts = model.config.num_moe_experts
    expert_to_rank = torch.arange(num_experts) // (num_experts // args.expert_model_parallel_size)
    last = dist.get_world_size() - 1
    keep, recorder = _KeepLoads(), _Recorder()
    attach_megatron(model, recorder)
    sum_nll(model, windows[:1, : min(9, windows.shape[1])], 1)  # warm-up
    rows = []
    for index, (name, cfg) in enumerate(_runs(args)):
        set_capacity(model, cfg)
        prefix = f"capaware/{name.replace(' ', '_')}"
        recorder.tracker = LoadTracker(args.num_layers, num_experts, expert_to_rank, interval=0,
                                       sinks=[keep, *megatron_sinks()], log_rank=last,
                                       per_expert=True, prefix=prefix)
        nll, seconds = _timed(sum_nll, model, windows, args.micro_batch_size)
        recorder.tracker.step()
        metrics = recorder.tracker.flush(index)
        recorder.tracker = None
        generated = greedy_generate(model, prompts, args.num_tokens_to_generate)
        scores = _lm_eval(model, tokenizer, args) if args.lm_eval_tasks else {}
        dist.all_reduce(nll, group=parallel_state.get_data_parallel_group())
        slowest = torch.tensor([seconds], device=nll.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if dist.get_rank() == last:
            rows.append(dict(
                name=name, policy=cfg.policy, gamma=cfg.capacity_factor,
                perplexity=math.exp(float(nll[0] / nll[1])), tokens=int(nll[1]), seconds=float(slowest),
                metrics={key[len(prefix) + 1:]: value for key, value in metrics.items() if "/layer_" not in key},
                loads=keep.loads, generated=generated.tolist(),
                generated_text=[tokenizer.detokenize(row) for row in generated.tolist()],
                lm_eval=scores))
    return rows if dist.get_rank() == last else None


def table(rows) -> str:
    base = rows[0]
    tasks = sorted({key for row in rows for key in row["lm_eval"]})
    head = ("| run | ppl | Δppl % | dropped % | rerouted % | straggler/exp | straggler/rank | "
            "projected | measured | gen. agree % |" + "".join(f" {task} |" for task in tasks))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        m = row["metrics"]
        agree = torch.tensor(row["generated"]) == torch.tensor(base["generated"])
        agreement = f"{100 * float(agree.double().mean()):.0f}" if agree.numel() else "n/a"
        lines.append(
            f"| {row['name']} | {row['perplexity']:.4g} | {100 * (row['perplexity'] / base['perplexity'] - 1):+.2f} | "
            f"{100 * m.get('dropped_fraction', 0.0):.2f} | {100 * m.get('rerouted_fraction', 0.0):.2f} | "
            f"{m['straggler_expert_before']:.2f} > {m['straggler_expert_after']:.2f} | "
            f"{m['straggler_rank_before']:.2f} > {m['straggler_rank_after']:.2f} | "
            f"{m['speedup_rank']:.2f}x | {base['seconds'] / row['seconds']:.2f}x | "
            f"{agreement} |"
            + "".join(f" {row['lm_eval'].get(task, float('nan')):.4g} |" for task in tasks))
    return "\n".join(lines)


def write_outputs(rows, args, checkpoint, expert_to_rank) -> list:
    from capaware_megatron import figures

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(dict(hf_path=checkpoint.path, architecture=checkpoint.architecture.name,
                       text=args.text, seq_length=args.seq_length, runs=rows), handle, indent=1)
    with open(os.path.join(args.out, "quality.md"), "w") as handle:
        handle.write(table(rows) + "\n")
    capped = [row for row in rows if row["policy"] == "drop"] or rows[1:] or rows
    chosen = min(capped, key=lambda row: row["gamma"] or math.inf)
    loads = {stage: torch.tensor(value) for stage, value in chosen["loads"].items()}
    title = (f"{checkpoint.architecture.name}, {chosen['name']}, EP{args.expert_model_parallel_size}: "
             "tokens per expert / mean")
    points = [figures.QualityPoint(row["name"], row["policy"] or "none", row["gamma"], row["perplexity"],
                                   row["metrics"]["speedup_rank"], rows[0]["seconds"] / row["seconds"])
              for row in rows]
    return [
        figures.save(figures.load_heatmap(loads["before"], loads["after"], expert_to_rank, title),
                     os.path.join(args.out, "load.png")),
        figures.save(figures.quality_vs_speedup(points, f"{checkpoint.architecture.name}: perplexity vs speedup"),
                     os.path.join(args.out, "quality_vs_speedup.png")),
        os.path.join(args.out, "quality.md"), os.path.join(args.out, "results.json"),
    ]


def main() -> None:
    checkpoint = _checkpoint_from_argv(sys.argv[1:])
    sys.argv = [sys.argv[0], *with_checkpoint_shape(sys.argv[1:], checkpoint)]
    parse_and_validate_args(extra_args_provider=add_hf_args, args_defaults=_megatron_defaults(checkpoint))
    args = get_args()
    _check_supported(args, checkpoint)
    initialize_megatron()
    tokenizer = get_tokenizer()
    with open(args.text, encoding="utf-8") as handle:
        ids = torch.tensor(tokenizer.tokenize(handle.read()), dtype=torch.long)
    windows = token_windows(ids, args.seq_length)[: args.max_windows]
    mine = data_parallel_share(windows, parallel_state.get_data_parallel_rank(),
                               parallel_state.get_data_parallel_world_size(), args.micro_batch_size)
    prompts = [tokenizer.tokenize(text) for text in (args.prompt or DEFAULT_PROMPTS)]
    width = min(len(prompt) for prompt in prompts)
    prompts = torch.tensor([prompt[:width] for prompt in prompts], dtype=torch.long)
    model = _build(checkpoint, args)
    rows = sweep(model, args, mine, prompts)
    if rows is not None:
        num_experts = model.config.num_moe_experts
        expert_to_rank = torch.arange(num_experts) // (num_experts // args.expert_model_parallel_size)
        print(f"\n{checkpoint.architecture.name} from {checkpoint.path}: {rows[0]['tokens']} tokens of "
              f"{args.text} per run, windows of {args.seq_length}, TP{args.tensor_model_parallel_size} "
              f"PP{args.pipeline_model_parallel_size} EP{args.expert_model_parallel_size} DP{parallel_state.get_data_parallel_world_size()}\n")
        print(table(rows))
        print("\nstraggler: max/mean load, router > plan (per expert, per EP rank); projected: max EP-rank "
              "load before / after; measured: dropless forward time / this run's (slowest rank); gen. "
              "agree: greedy tokens equal to dropless's.")
        for row in rows:
            print(f"  {row['name']:>14}: {row['generated_text'][0]!r}")
        written = write_outputs(rows, args, checkpoint, expert_to_rank)
        print(f"\nwrote {', '.join(written)}")
    dist.barrier()


if __name__ == "__main__":
    main()
