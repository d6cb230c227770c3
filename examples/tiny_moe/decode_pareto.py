"""The decode Pareto: each decode setting's MoE step time against its decode quality.

    python examples/tiny_moe/decode_pareto.py [--batches 8 32 128] [--ep 2 4] [--windows 128]
        [--tune-windows 64] [--generate-bytes 48] [--rounds 7]

For B sequences per EP rank (a decode step: B tokens per rank) and EP 2 / 4, the settings

    dropless        Megatron's E/k padding, nothing dropped (the capaware layer at gamma None)
    g1.0 local      drop at gamma 1.0, each rank its own tokens
    g1.0 global     drop at gamma 1.0 over the EP group's step
    g1.0 floor      drop at gamma 1.0 with the calibrated floor: min_capacity = the knee of the
                    timed layer's expert GEMMs on this machine (capaware_megatron.calibrate)
    gD floor        the decode factor chosen for this batch size (and EP): the smallest in
                    DECODE_FACTORS whose decode perplexity on the tuning windows (held out
                    from the evaluation windows) is within 2% of dropless, with the floor

are measured for
1. quality on the trained tiny GPT-MoE, expert parallelism simulated in one process (as
   evidence.py does): teacher-forced decode perplexity (each position's B tokens per rank
   planned apart, as a decode engine's steps see them) and greedy generation's byte agreement
   with dropless (every step planned per position as decode steps are, the prompt's too);
2. time on the MoE layer of bench_decode.py (hidden 512, FFN 1024, E 8, top-2) over gloo,
   switched with Megatron's set_decode_expert_padding: one decode step, interleaved rounds,
   the slowest rank's time, median and IQR.

The goal: at every batch size a setting within 2% of dropless perplexity that keeps >= 90% of
gamma 1.0 local drop's step-time saving over Megatron's E/k padding. The results go to stdout
(the results file) and the figure to --figure.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
from bench_decode import LAYER, decode_step_samples  # noqa: E402
from timing import device_name, quartiles  # noqa: E402
from tiny_moe import model as tiny  # noqa: E402
from tiny_moe.evidence import generate, perplexity, trained_model_with_simulated_ranks  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.calibrate import ExpertShape, measure  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402
from capaware_megatron.quiet import quiet_frameworks  # noqa: E402

DECODE_FACTORS = (1.0, 1.1, 1.25, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
QUALITY_LIMIT = 0.02  # within 2% of dropless perplexity
SAVING_SHARE = 0.90  # of gamma 1.0 local drop's saving


def settings(floor: int, decode_factor: float) -> dict[str, CapacityConfig]:
    return {
        "dropless": CapacityConfig(None),
        "g1.0 local": CapacityConfig(1.0),
        "g1.0 global": CapacityConfig(1.0, scope="global"),
        "g1.0 floor": CapacityConfig(1.0, min_capacity=floor),
        f"g{decode_factor:g} floor": CapacityConfig(decode_capacity_factor=decode_factor, min_capacity=floor),
    }


def _knees(eps: tuple[int, ...], max_rows: int) -> dict[int, tuple[int, list]]:
    """{ep: (knee, [(rows, ms)])} of the timed layer's experts on one CPU thread (as each gloo
    rank runs), E / ep experts per rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        knees = {}
        for ep in eps:
            shape = ExpertShape(LAYER["hidden"], LAYER["ffn"], "float32", LAYER["experts"] // ep)
            calibration = measure(shape, "cpu", max_rows=max_rows, rounds=3, min_run_time=0.02)
            knees[ep] = (calibration.knee_rows, list(zip(calibration.rows, calibration.milliseconds)))
        return knees
    finally:
        torch.set_num_threads(threads)


def _quality(rank, world_size, batches, eps, floors, num_windows, tune_windows, generate_bytes):
    """{(B, ep): {setting: (perplexity, dropped share, byte agreement)}} and the chosen decode
    factors; each (B, ep) evaluates max(num_windows, B x ep) windows, whole decode steps."""
    model, ranks = trained_model_with_simulated_ranks()
    windows = tiny.windows(tiny.corpus("heldout", max_bytes=2_000_000))
    results, chosen = {}, {}
    grid = [(batch, ep) for batch in batches for ep in eps]
    for batch, ep in tqdm(grid, desc="decode quality", unit="setting", dynamic_ncols=True):
        sequences = batch * ep  # a decode step's batch over the EP group: whole steps only
        evaluation = windows[: max(num_windows, sequences) // sequences * sequences]
        tuning = windows[len(evaluation):][: max(tune_windows, sequences) // sequences * sequences]
        prompts_from = len(evaluation) + len(tuning)
        if prompts_from + sequences > len(windows):
            raise ValueError(f"the held-out text has {len(windows)} windows, B {batch} x EP{ep} needs {prompts_from + sequences}")
        ranks.set(CapacityConfig(None), ep, batch, True)
        tuned_dropless = perplexity(model, tuning, sequences)
        factor = DECODE_FACTORS[-1]
        for candidate in DECODE_FACTORS:
            ranks.set(CapacityConfig(decode_capacity_factor=candidate, min_capacity=floors[ep]), ep, batch, True)
            if perplexity(model, tuning, sequences) <= tuned_dropless * (1 + QUALITY_LIMIT):
                factor = candidate
                break
        chosen[(batch, ep)] = factor
        prompts = windows[prompts_from:prompts_from + sequences, :tiny.SEQ - generate_bytes]
        row, reference = {}, None
        for name, cfg in settings(floors[ep], factor).items():
            ranks.set(cfg, ep, batch, True)
            value = perplexity(model, evaluation, sequences)
            dropped = ranks.dropped / max(ranks.routed, 1)
            tokens = generate(model, prompts, generate_bytes)
            reference = tokens if reference is None else reference
            row[name] = (value, dropped, float((tokens == reference).double().mean()))
        results[(batch, ep)] = row
    return results, chosen


def _times(batches, eps, floors, chosen, rounds):
    """{(B, ep): {setting: (seconds per round, rows)}}; "Megatron E/k" is the stock dispatcher."""
    times = {}
    grid = [(batch, ep) for batch in batches for ep in eps]
    for batch, ep in tqdm(grid, desc="decode step time", unit="setting", dynamic_ncols=True):
        configs = {"Megatron E/k": None, **settings(floors[ep], chosen[(batch, ep)])}
        times[(batch, ep)] = run_gloo(decode_step_samples, ep, batch, rounds, dict(LAYER), configs,
                                      timeout=3600)[0]
    return times


def _report(quality, times, chosen) -> tuple[list[str], list, dict]:
    from capaware_megatron.figures import DecodePoint

    lines, points, baseline = [], [], {}
    head = (f"{'B':>4} {'EP':>3} {'setting':<12} {'rows':>5} {'ms median':>10} {'IQR ms':>15} "
            f"{'saving':>8} {'of g1.0':>8} {'ppl':>8} {'vs dropless':>11} {'drop%':>6} {'bytes same':>10}")
    lines += [head, "-" * len(head)]
    verdicts = []
    for (batch, ep), row in quality.items():
        samples = times[(batch, ep)]
        stock = quartiles(samples["Megatron E/k"][0])[1]
        baseline[(batch, ep)] = 1e3 * stock
        reference_saving = stock - quartiles(samples["g1.0 local"][0])[1]
        decode_name = list(row)[-1]  # the chosen decode factor's setting
        meeting, best = [], None  # best: the largest share of the saving within 2%
        for name in ("Megatron E/k", *row):
            seconds, rows = samples[name]
            q1, median, q3 = quartiles(seconds)
            saving = stock - median
            share = saving / reference_saving if reference_saving > 0 else float("nan")
            if name == "Megatron E/k":
                quality_cells = f"{'':>8} {'':>11} {'':>6} {'':>10}"
            else:
                value, dropped, same = row[name]
                increase = value / row["dropless"][0] - 1
                quality_cells = f"{value:>8.4f} {100 * increase:>+10.2f}% {100 * dropped:>5.1f}% {100 * same:>9.1f}%"
                kind = "decode factor + floor" if name == decode_name else name
                points.append(DecodePoint(kind, name, batch, ep, 1e3 * median, 100 * increase))
                if increase <= QUALITY_LIMIT:
                    best = max(best or (share, name), (share, name))
                    if share >= SAVING_SHARE:
                        meeting.append(name)
            lines.append(f"{batch:>4} {ep:>3} {name:<12} {rows:>5} {1e3 * median:>10.2f} "
                         f"{1e3 * q1:>7.2f}-{1e3 * q3:<7.2f} {1e3 * saving:>+7.2f} {100 * share:>7.0f}% " + quality_cells)
        best_cell = "none" if best is None else f"{best[1]} keeps {100 * best[0]:.0f}%"
        verdicts.append(f"B {batch:>3} EP{ep}: decode factor {chosen[(batch, ep)]:g}; g1.0 local saves "
                        f"{1e3 * reference_saving:+.2f} ms; within 2% of dropless the most saving: {best_cell}; "
                        f"goal (>= 90%) {'met by ' + ', '.join(meeting) if meeting else 'not met'}")
    lines += ["", *verdicts]
    return lines, points, baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128], help="sequences per EP rank")
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--windows", type=int, default=128, help="held-out windows of 128 bytes (evaluation)")
    parser.add_argument("--tune-windows", type=int, default=64, help="further held-out windows choosing the decode factor")
    parser.add_argument("--generate-bytes", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-rows", type=int, default=128, help="calibration: the most rows per expert timed")
    parser.add_argument("--figure", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "docs", "figures",
                                                           "decode_pareto.png"))
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own warnings")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the table reports quartiles)")
    quiet_frameworks(args.verbose)
    import subprocess

    from capaware_megatron import figures

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    knees = _knees(tuple(args.ep), args.max_rows)
    floors = {ep: knee for ep, (knee, _) in knees.items()}
    quality, chosen = run_gloo(_quality, 1, tuple(args.batches), tuple(args.ep), floors, args.windows,
                                         args.tune_windows, args.generate_bytes, timeout=7200)[0]
    times = _times(tuple(args.batches), tuple(args.ep), floors, chosen, args.rounds)
    lines, points, baseline = _report(quality, times, chosen)
    print(f"Decode Pareto; commit {commit}; {device_name(torch.device('cpu'))}; command: python "
          f"examples/tiny_moe/decode_pareto.py --batches {' '.join(map(str, args.batches))} --ep "
          f"{' '.join(map(str, args.ep))} --windows {args.windows} --tune-windows {args.tune_windows} "
          f"--generate-bytes {args.generate_bytes} --rounds {args.rounds} --max-rows {args.max_rows}\n")
    print(f"Quality: trained tiny GPT-MoE, max({args.windows}, B x EP) held-out windows of 128 bytes per "
          "setting, teacher-forced decode (each position's B tokens per rank planned apart), against the "
          f"dropless row's perplexity on the same windows; generation: B x EP held-out prompts, "
          f"{args.generate_bytes} greedy bytes each, share of bytes equal to dropless's.")
    print(f"Time: Megatron-Core MoE layer H={LAYER['hidden']} F={LAYER['ffn']} E={LAYER['experts']} "
          f"top-{LAYER['topk']}, one padded decode step (set_decode_expert_padding), gloo, 1 thread per "
          f"rank, {args.rounds} interleaved rounds; saving = Megatron E/k median - the setting's; "
          "'of g1.0' = saving / g1.0 local's saving.")
    for ep, (knee, table) in knees.items():
        cells = ", ".join(f"{rows}:{ms:.3f}" for rows, ms in table)
        print(f"Calibrated floor, EP{ep} ({LAYER['experts'] // ep} experts per rank): knee {knee} rows "
              f"(rows:ms {cells})")
    print()
    print("\n".join(lines))
    figure = figures.decode_pareto(points, baseline, title=f"decode Pareto (commit {commit})")
    print(f"\nfigure: {os.path.relpath(figures.save(figure, args.figure))}")


if __name__ == "__main__":
    main()
