"""Compile every Triton kernel variant for Hopper (sm_90) without a GPU; prints one JSON line.

Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from capaware_megatron.kernels import permute, routing_plan

HOPPER = GPUTarget("cuda", 90, 32)
POINTER = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
SELECT_ARGS = {
    "lists_ptr": "*i64", "counts_ptr": "*i32", "bin_experts_ptr": "*i64", "thresholds_ptr": "*i64",
    "top_ptr": "*i64", "num_tokens": "i32", "experts_per_bin": "i32", "capacity": "i32",
}


def _collect_args(scores, probs, offset="i64", salt="i64"):
    return {
        "scores_ptr": POINTER[scores], "candidates_ptr": "*u8", "map_ptr": "*u8",
        "probs_ptr": POINTER[probs], "keep_ptr": "*i8", "weights_ptr": POINTER[probs],
        "lists_ptr": "*i64", "counts_ptr": "*i32", "num_tokens": "i32", "num_experts": "i32",
        **{f"stride_{name}": "i32" for name in ("st", "se", "ct", "ce", "mt", "me", "pt", "pe")},
        "token_offset": offset, "salt": salt,
    }


def _drop_args(dtype, offset="i32"):
    return {
        "lists_ptr": "*i64", "counts_ptr": "*i32", "expert_to_bin_ptr": "*i64",
        "thresholds_ptr": "*i64", "keep_ptr": "*i8", "weights_ptr": POINTER[dtype], "kept_ptr": "*i64",
        "num_tokens": "i32", "num_experts": "i32", "token_offset": offset,
    }


def _permute_args(dtype):
    return {
        "map_ptr": "*u8", "probs_ptr": POINTER[dtype], "offsets_ptr": "*i64",
        "sorted_ptr": "*i64", "permuted_probs_ptr": POINTER[dtype], "num_tokens": "i32",
        "total": "i32", "stride_mt": "i32", "stride_me": "i32", "stride_pt": "i32",
        "stride_pe": "i32",
    }


def variants():
    """(name, kernel, signature, constexprs) of every variant the launchers can produce."""
    for prio, code in routing_plan.PRIORITY_CODES.items():
        for dtype in POINTER if prio == "score" else ["fp32"]:
            for has_probs in (False, True):
                for block_e in (1, 128):
                    yield (
                        f"collect-{prio}-{dtype}-probs{int(has_probs)}-E{block_e}",
                        routing_plan._collect_kernel, _collect_args(dtype, dtype),
                        {"PRIORITY": code, "HAS_PROBS": has_probs, "OFFSET_IN_MEMORY": False,
                         "BLOCK_T": 4096 // block_e, "BLOCK_E": block_e},
                    )
    # fp32 router weights with bf16 scores; 32-bit token offset and salt.
    yield ("collect-score-bf16-fp32probs", routing_plan._collect_kernel, _collect_args("bf16", "fp32"),
           {"PRIORITY": 0, "HAS_PROBS": True, "OFFSET_IN_MEMORY": False, "BLOCK_T": 32, "BLOCK_E": 128})
    yield ("collect-random-i32", routing_plan._collect_kernel, _collect_args("fp32", "fp32", "i32", "i32"),
           {"PRIORITY": 3, "HAS_PROBS": False, "OFFSET_IN_MEMORY": False, "BLOCK_T": 32, "BLOCK_E": 128})
    # The token offset in device memory (global scope, eager: the group's counts stay there).
    for prio in ("score", "reverse", "random"):
        yield (f"collect-{prio}-offset-in-memory", routing_plan._collect_kernel,
               _collect_args("fp32", "fp32", "*i64"),
               {"PRIORITY": routing_plan.PRIORITY_CODES[prio], "HAS_PROBS": True, "OFFSET_IN_MEMORY": True,
                "BLOCK_T": 32, "BLOCK_E": 128})
    for write_top in (False, True):
        for block_m in (1, 512):
            yield (f"select-top{int(write_top)}-M{block_m}", routing_plan._select_kernel, SELECT_ARGS,
                   {"WRITE_TOP": write_top, "BLOCK": 1024, "BLOCK_M": block_m})
    for dtype in POINTER:
        yield f"drop-{dtype}", routing_plan._drop_kernel, _drop_args(dtype), {"OFFSET_IN_MEMORY": False, "BLOCK": 1024}
    yield ("drop-fp32-offset-in-memory", routing_plan._drop_kernel, _drop_args("fp32", "*i64"),
           {"OFFSET_IN_MEMORY": True, "BLOCK": 1024})
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
