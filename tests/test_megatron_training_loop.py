"""Megatron-LM's own training loop (`megatron.training.pretrain` from the installed wheel) through
the run wrapper, at world size 2 with EP2 over gloo: training with evaluations, an evaluation
from the saved checkpoint with --skip-train, and a resume. What reaches Megatron's TensorBoard
and W&B writers (on the last rank) is read back and checked against Megatron's own iterations.
Then an inference script of the same shape as Megatron-LM's generates from that checkpoint
with CUDA-graph-style padded decode steps."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

import wandb_reader  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "pretrain_tiny_moe.py")
MICRO_BATCH, SEQ, EXPERTS, TOPK, GAMMA = 4, 32, 4, 2, 1.0
CAPACITY = math.ceil(GAMMA * MICRO_BATCH * SEQ * TOPK / EXPERTS)  # per rank: local scope
MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
    "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(2 * MICRO_BATCH),
    "--num-experts", str(EXPERTS), "--moe-router-topk", str(TOPK),
    "--expert-model-parallel-size", "2", "--lr", "1e-3", "--lr-decay-iters", "8", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "128", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
    "--num-workers", "0",
    # CPU, gloo: what Megatron-LM's own flags switch off (the rest is cpu_shims).
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--transformer-impl", "local",
    "--clip-grad", "0.0", "--no-persist-layer-norm", "--disable-bias-linear",
    "--no-gradient-accumulation-fusion",
    "--moe-token-dispatcher", "capaware", "--capaware-capacity-factor", str(GAMMA),
    "--capaware-log-interval", "1",
]


def _pretrain(workdir, name, *argv, script=SCRIPT, model=MODEL):
    """torchrun -m capaware_megatron.megatron.run /abs/SCRIPT, from another folder."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
        str(29500 + os.getpid() % 1000), "-m", "capaware_megatron.megatron.run", script, *model,
        "--tensorboard-dir", str(workdir / "tb" / name), "--wandb-project", "capaware-test",
        "--wandb-exp-name", name, "--wandb-save-dir", str(workdir / "wandb" / name), *argv,
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workdir, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
    return out.stdout


def _scalars(workdir, name):
    """{tag: [(step, value), ...]} of the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tb" / name))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("megatron_loop")
    checkpoint = str(workdir / "checkpoint")
    printed = {
        # 4 iterations, evaluations at 2 and 4, then Megatron's final validation and test passes.
        "train": _pretrain(workdir, "train", "--train-iters", "4", "--save", checkpoint,
                           "--save-interval", "4"),
        # Evaluation only, from the checkpoint, the model built from a ModelConfig.
        "eval": _pretrain(workdir, "eval", "--train-iters", "4", "--load", checkpoint,
                          "--no-load-rng", "--skip-train", "--tiny-model-from", "config"),
        # Resumed at iteration 4: Megatron runs 5 and 6.
        "resume": _pretrain(workdir, "resume", "--train-iters", "6", "--load", checkpoint,
                            "--no-load-rng", "--use-checkpoint-opt_param-scheduler"),
    }
    return workdir, printed


def _steps(scalars, tag):
    return [step for step, _ in scalars[tag]]


def test_training_and_evaluation_reach_tensorboard_apart_at_megatrons_iterations(runs):
    workdir, printed = runs
    scalars = _scalars(workdir, "train")
    assert _steps(scalars, "lm loss") == [1, 2, 3, 4]
    assert _steps(scalars, "capaware/dropped_fraction") == [1, 2, 3, 4]
    # Megatron's validation passes: at 2 and 4 in the loop, once more after it; the test pass.
    assert _steps(scalars, "capaware/eval/dropped_fraction") == [2, 4, 4]
    assert _steps(scalars, "capaware/test/dropped_fraction") == [4]
    for layer in range(2):
        assert f"capaware/layer_{layer}/straggler_expert_before" in scalars
        assert f"capaware/eval/layer_{layer}/dropped_fraction" in scalars
    # Dropless training (no --capaware-apply-in-training), capped evaluation: never mixed.
    assert all(value == 0 for _, value in scalars["capaware/dropped_fraction"])
    assert all(value > 0 for _, value in scalars["capaware/eval/dropped_fraction"])
    assert all(value == CAPACITY for _, value in scalars["capaware/eval/layer_0/capacity"])
    # An expert receives at most CAPACITY rows from each of the 2 source ranks (local scope).
    before = [value for _, value in scalars["capaware/eval/layer_1/max_tokens_before"]]
    after = [value for _, value in scalars["capaware/eval/layer_1/max_tokens_after"]]
    assert max(after) <= 2 * CAPACITY < max(before)
    assert "[capaware/eval] step 4" in printed["train"] and "[capaware/test] step 4" in printed["train"]


def test_skip_train_evaluation_from_a_checkpoint_is_reported(runs):
    workdir, printed = runs
    scalars = _scalars(workdir, "eval")
    assert _steps(scalars, "capaware/eval/dropped_fraction") == [4]  # the loaded iteration
    assert _steps(scalars, "capaware/test/dropped_fraction") == [4]
    assert not any(tag.startswith("capaware/") and tag.split("/")[1] not in ("eval", "test")
                   for tag in scalars), "nothing trained, nothing reported as training"
    assert "[capaware/eval] step 4" in printed["eval"]


def test_a_resumed_run_logs_megatrons_iterations(runs):
    workdir, _ = runs
    scalars = _scalars(workdir, "resume")
    assert _steps(scalars, "lm loss") == [5, 6]
    assert _steps(scalars, "capaware/dropped_fraction") == [5, 6]
    assert _steps(scalars, "capaware/eval/dropped_fraction") == [6, 6]


def test_wandb_rows_carry_megatrons_iterations(runs):
    workdir, _ = runs
    rows = wandb_reader.history(workdir / "wandb" / "resume")
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [5, 6]
    for step in (5, 6):
        assert "lm loss" in by_step[step] and "capaware/straggler_expert_before" in by_step[step]
        assert "capaware_layers/layer_1/dropped_fraction" in by_step[step]
    assert by_step[6]["capaware/eval/dropped_fraction"] > 0
    rows = wandb_reader.history(workdir / "wandb" / "train")
    assert {row["_step"] for row in rows if "capaware/test/dropped_fraction" in row} == {4}


GENERATE = os.path.join(os.path.dirname(__file__), "scripts", "generate_tiny_moe.py")
PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 8, 6, 4


def _generate(workdir, name, dispatcher_args):
    """Greedy generation from the training run's checkpoint; [rank][sequence][token]."""
    model = [arg for arg in MODEL if arg not in ("capaware", "--moe-token-dispatcher",
                                                 "--capaware-capacity-factor", str(GAMMA))]
    out = workdir / "generated" / name
    out.parent.mkdir(exist_ok=True)
    _pretrain(workdir, name, "--load", str(workdir / "checkpoint"),
              "--moe-pad-experts-for-cuda-graph-inference", "--prompts-per-rank", str(PROMPTS),
              "--prompt-length", str(PROMPT_LENGTH), "--num-tokens-to-generate", str(NEW_TOKENS),
              "--output-path", str(out), *dispatcher_args, script=GENERATE, model=model)
    return [json.loads((out.parent / f"{name}.rank{rank}.json").read_text()) for rank in range(2)]


def test_an_inference_script_generates_with_capacity_aware_decode(runs):
    workdir, _ = runs
    capped = _generate(workdir, "generate-capaware", ["--moe-token-dispatcher", "capaware",
                                                      "--capaware-capacity-factor", str(GAMMA)])
    dropless = _generate(workdir, "generate-dropless", ["--moe-token-dispatcher", "capaware"])
    stock = _generate(workdir, "generate-alltoall", ["--moe-token-dispatcher-type", "alltoall"])
    assert dropless == stock, "dropless capaware decodes exactly as Megatron's own E/k padding"
    assert capped != stock, "the cap binds at decode (8 tokens per rank, 4 experts)"
    scalars = _scalars(workdir, "generate-capaware")
    # Forward pass 1 is the eager prefill, 2..4 the padded decode steps.
    assert _steps(scalars, "capaware/inference/dropped_fraction") == [1]
    assert _steps(scalars, "capaware/decode/dropped_fraction") == [2, 3, 4]
    assert scalars["capaware/inference/capacity"] == [
        (1, math.ceil(GAMMA * PROMPTS * PROMPT_LENGTH * TOPK / EXPERTS))]
    decode_capacity = min(math.ceil(GAMMA * PROMPTS * TOPK / EXPERTS), PROMPTS)
    assert [value for _, value in scalars["capaware/decode/capacity"]] == [decode_capacity] * 3
    assert all(value <= 2 * decode_capacity for _, value in scalars["capaware/decode/layer_0/max_tokens_after"])
    assert not any(tag.startswith("capaware/eval") for tag in scalars)
