"""Compile every Triton kernel variant for Hopper (sm_90) without a GPU; prints one JSON line.

Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from capaware_megatron.kernels import permute, reroute, routing_plan

HOPPER = GPUTarget("cuda", 90, 32)
POINTER = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
KEYS_ARGS = {
    "candidates_ptr": "*u8", "keys_ptr": "*i64", "num_tokens": "i32", "num_experts": "i32",
    "stride_st": "i32", "stride_se": "i32", "stride_ct": "i32", "stride_ce": "i32",
    "token_offset": "i64", "salt": "i64",
}
THRESHOLD_ARGS = {
    "keys_ptr": "*i64", "bin_experts_ptr": "*i64", "thresholds_ptr": "*i64",
    "num_tokens": "i32", "num_experts": "i32", "experts_per_bin": "i32", "capacity": "i32",
}


PROPOSE_ARGS = {
    "preference_ptr": "*i64", "pending_ptr": "*i64", "slot_ptr": "*i64", "rank_ptr": "*i64",
    "used_ptr": "*u8", "room_ptr": "*i64", "bin_ptr": "*i64", "expert_ptr": "*i64",
    "has_choice_ptr": "*i8", "num_pending": "i32", "num_experts": "i32",
}


def _permute_args(dtype):
    return {
        "map_ptr": "*u8", "probs_ptr": POINTER[dtype], "offsets_ptr": "*i64",
        "sorted_ptr": "*i64", "permuted_probs_ptr": POINTER[dtype], "num_tokens": "i32",
        "total": "i32", "stride_mt": "i32", "stride_me": "i32", "stride_pt": "i32",
        "stride_pe": "i32",
    }


def _apply_args(dtype):
    return {
        "keys_ptr": "*i64", "thresholds_ptr": "*i64", "expert_to_bin_ptr": "*i64", "map_ptr": "*u8",
        "probs_ptr": POINTER[dtype], "scores_ptr": POINTER[dtype], "keep_ptr": "*i8",
        "weights_ptr": POINTER[dtype], "counts_ptr": "*i64", "num_tokens": "i32", "num_experts": "i32",
        "stride_mt": "i32", "stride_me": "i32", "stride_pt": "i32", "stride_pe": "i32",
        "stride_st": "i32", "stride_se": "i32",
    }


def variants():
    """(name, kernel, signature, constexprs) of every variant the launchers can produce."""
    for prio, code in routing_plan.PRIORITY_CODES.items():
        for dtype in POINTER if prio == "score" else ["fp32"]:
            for block_e in (1, 128):
                yield (
                    f"keys-{prio}-{dtype}-E{block_e}", routing_plan._keys_kernel,
                    {"scores_ptr": POINTER[dtype], **KEYS_ARGS},
                    {"PRIORITY": code, "BLOCK_T": 4096 // block_e, "BLOCK_E": block_e},
                )
    yield "threshold", routing_plan._threshold_kernel, THRESHOLD_ARGS, {"BLOCK": 1024}
    for dtype in POINTER:
        for block_e in (1, 128):
            yield (f"apply-{dtype}-E{block_e}", routing_plan._apply_kernel, _apply_args(dtype),
                   {"BLOCK_T": 4096 // block_e, "BLOCK_E": block_e})
    for block_e in (8, 512):
        yield (f"propose-E{block_e}", reroute._propose_kernel, PROPOSE_ARGS,
               {"BLOCK_P": 4096 // block_e, "BLOCK_E": block_e})
    for dtype in POINTER:
        yield f"permute-{dtype}", permute._permute_index_kernel, _permute_args(dtype), {"BLOCK_T": 1024}


def main() -> None:
    results = {}
    for name, fn, signature, constexprs in variants():
        signature = {**signature, **{key: "constexpr" for key in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=HOPPER)
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
        except Exception as err:  # noqa: BLE001 - reported per variant
            results[name] = f"{type(err).__name__}: {err}"
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
