"""A small Megatron-Core GPT-MoE over bytes of the Python standard library's source.

Shared by train.py (single process, dropless) and demo.py (expert parallel over gloo): the
model configuration, the data, and an expert-parallel-aware checkpoint loader.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
import warnings
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "checkpoint")

MODEL = dict(
    num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
    num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256,
    # A weak load-balancing loss, as trained MoE models use: it leaves the routers' real skew.
    moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
)
VOCAB, SEQ = 256, 128


def stdlib_files() -> list[str]:
    """Every .py file of this interpreter's standard library (tests and site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    skip = ("site-packages", "/test/", "/tests/", "idle_test", "/lib2to3/")
    return [f for f in files if not any(s in f for s in skip)]


def corpus(split: str, max_bytes: Optional[int] = None) -> torch.Tensor:
    """uint8 bytes of the train split (19 files in 20) or the held-out split (the 20th)."""
    files = stdlib_files()
    chosen = [f for i, f in enumerate(files) if (i % 20 == 19) == (split == "heldout")]
    data = bytearray()
    for path in chosen:
        with open(path, "rb") as handle:
            data += handle.read() + b"\n"
        if max_bytes is not None and len(data) >= max_bytes:
            break
    return torch.frombuffer(bytes(data[:max_bytes]), dtype=torch.uint8).long()


def windows(data: torch.Tensor) -> torch.Tensor:
    """[N, SEQ + 1] consecutive, non-overlapping windows of a byte stream (inputs and labels)."""
    return data[: (data.numel() // (SEQ + 1)) * (SEQ + 1)].view(-1, SEQ + 1)


def batches(data: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless random [batch, SEQ + 1] windows (inputs and shifted labels)."""
    while True:
        start = torch.randint(0, data.numel() - SEQ - 1, (batch_size,), generator=generator)
        yield torch.stack([data[s : s + SEQ + 1] for s in start.tolist()])


def build(dispatcher: str = "alltoall", ep: int = 1, **overrides):
    """The GPT-MoE (Megatron-Core GPTModel, local layer spec) for this process's parallel state."""
    warnings.filterwarnings("ignore")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        **{**MODEL, **overrides}, moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=ep,
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec(num_experts=MODEL["num_moe_experts"], moe_grouped_gemm=False)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, pre_process=True, post_process=True)


def forward_loss(model, window: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [batch, SEQ] of a window batch [batch, SEQ + 1]."""
    tokens, labels = window[:, :-1], window[:, 1:]
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    causal = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)  # True = masked out
    return model(tokens, positions, causal, labels=labels)


def expert_key(layer: int, expert: int, name: str) -> str:
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{name}"


def save_checkpoint(model, meta: dict) -> None:
    os.makedirs(CHECKPOINT, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    torch.save(state, os.path.join(CHECKPOINT, "model.pt"))
    with open(os.path.join(CHECKPOINT, "meta.json"), "w") as handle:
        json.dump({"model": MODEL, "vocab": VOCAB, "seq": SEQ, **meta}, handle, indent=2)


def load_checkpoint(model, ep_rank: int = 0, ep_size: int = 1) -> dict:
    """Load the single-process checkpoint into an expert-parallel model: each rank takes the
    weights of its own experts (global expert ep_rank * m + j for local expert j)."""
    state = torch.load(os.path.join(CHECKPOINT, "model.pt"), weights_only=True)
    per_rank = MODEL["num_moe_experts"] // ep_size
    mine = {}
    for key in model.state_dict():
        if ".local_experts." in key:
            head, tail = key.split(".local_experts.")
            local, rest = tail.split(".", 1)
            source = f"{head}.local_experts.{ep_rank * per_rank + int(local)}.{rest}"
        else:
            source = key
        if source in state:
            mine[key] = state[source].float()
    missing = [k for k in model.state_dict() if k not in mine and not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"checkpoint lacks {missing[:3]}...")
    model.load_state_dict(mine, strict=False)
    with open(os.path.join(CHECKPOINT, "meta.json")) as handle:
        return json.load(handle)
