"""Train the tiny GPT-MoE on the standard library's source (bytes), dropless, one CPU process.

    python examples/tiny_moe/train.py --steps 700 --seed 1234

Writes examples/tiny_moe/checkpoint/{model.pt (bf16), meta.json (seed, command, losses)}.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_moe import model as tiny  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' own warnings")
    args = parser.parse_args()
    from capaware_megatron.quiet import quiet_frameworks

    quiet_frameworks(args.verbose)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from capaware_megatron.megatron import cpu_shims

    cpu_shims.apply()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    model = tiny.build()
    params = sum(p.numel() for p in model.parameters())
    data = tiny.corpus("train")
    heldout = tiny.corpus("heldout", max_bytes=200_000)
    print(f"{params / 1e6:.2f}M parameters; {data.numel() / 1e6:.1f} MB train, "
          f"{heldout.numel() / 1e3:.0f} kB held-out bytes")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0)))
    )
    stream = tiny.batches(data, args.batch_size, torch.Generator().manual_seed(args.seed))
    start, losses = time.time(), []
    model.train()
    progress = tqdm(range(1, args.steps + 1), desc="training", unit="step", dynamic_ncols=True)
    for step in progress:
        loss = tiny.forward_loss(model, next(stream)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss))
        if step % 50 == 0 or step == args.steps:
            recent = sum(losses[-50:]) / len(losses[-50:])
            progress.set_postfix(loss=f"{recent:.3f}")
            progress.write(f"step {step:5d}  loss {recent:.3f} nats/byte  {time.time() - start:6.0f} s")
    model.eval()
    with torch.no_grad():
        windows = tiny.windows(heldout)
        heldout_nll = float(torch.cat([tiny.forward_loss(model, w.unsqueeze(0)).flatten() for w in windows[:64]]).mean())
    print(f"held-out loss {heldout_nll:.3f} nats/byte (perplexity {math.exp(heldout_nll):.2f})")
    tiny.save_checkpoint(model, {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "command": "python " + " ".join(sys.argv), "python": sys.version.split()[0],
        "train_minutes": round((time.time() - start) / 60, 1), "final_train_loss": sum(losses[-50:]) / 50,
        "heldout_loss": heldout_nll,
    })
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
