"""examples/hf_models/evaluate.py through launch/hf_models.sh: one command, Megatron's arguments.

A tiny random Qwen3-MoE checkpoint with a character-level tokenizer, EP2 over two gloo processes,
on the text the project ships. Its numbers are checked against the transformers model itself:
dropless perplexity and greedy generation equal the HF model's; each capped run's perplexity
equals the dense capacity-aware HF reference on the same data-parallel shards and micro-batches
(also at TP2 and PP2), and its generation HF's own KV-cached greedy decoding with that reference
(prefill, then one token per sequence per step; at PP2 through the pipeline, lm-eval too). The
table, figures, lm-eval scores and a Megatron checkpoint come out; that checkpoint, loaded at EP1,
gives the same perplexity. Bad flags stop before any weight is read.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("modelopt")
pytest.importorskip("lm_eval")

from hf_tiny import CharTokenizer, capped_reference, make_checkpoint, save_char_tokenizer, write_lm_eval_tasks  # noqa: E402

from capaware_megatron import CapacityConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "hf_models.sh")
SCRIPT = os.path.join(ROOT, "examples", "hf_models", "evaluate.py")
SAMPLE = os.path.join(ROOT, "examples", "hf_models", "sample.txt")
ARCH, SEQ, WINDOWS, MICRO_BATCH, GAMMA, NEW_TOKENS, EP = "qwen3_moe", 32, 8, 4, 1.0, 6, 2
POLICIES = ("drop", "reroute", "expanded")
PROMPTS = ["Alice was beginning to get very tired of", "Down, down, down. Would the fall"]


def _env(**extra):
    return dict(os.environ, PYTHON=sys.executable, TORCHDYNAMO_DISABLE="1", HF_DATASETS_OFFLINE="1",
                MASTER_PORT=str(29600 + os.getpid() % 1000), PATH=os.path.dirname(sys.executable)
                + os.pathsep + os.environ.get("PATH", ""), **extra)


def _launch(path, out, *argv, gpus=EP, ep=EP):
    command = ["bash", LAUNCH, "--seq-length", str(SEQ), "--micro-batch-size", str(MICRO_BATCH),
               "--max-windows", str(WINDOWS), "--num-tokens-to-generate", str(NEW_TOKENS),
               "--capaware-min-capacity", "0", "--out", str(out), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=_env(HF_PATH=path, GPUS_PER_NODE=str(gpus), EP=str(ep)))
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    with open(os.path.join(out, "results.json")) as handle:
        return json.load(handle), done.stdout


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_example")
    path = make_checkpoint(ARCH, str(root / "model"))
    save_char_tokenizer(path)
    tasks = write_lm_eval_tasks(root)
    results, printed = _launch(
        path, root / "out", "--capaware-sweep-gammas", str(GAMMA), "--capaware-sweep-policies", *POLICIES,
        "--lm-eval-tasks", "tiny_choice", "--lm-eval-include-path", tasks, "--save", str(root / "megatron"))
    reloaded, _ = _launch(str(root / "megatron" / "hf_config"), root / "out_ep1", "--load",
                          str(root / "megatron"), "--capaware-sweep-gammas", gpus=1, ep=1)
    tensor_parallel, _ = _launch(path, root / "out_tp2", "--tensor-model-parallel-size", "2",
                                 "--capaware-sweep-gammas", str(GAMMA), "--capaware-sweep-policies",
                                 "drop", ep=1)
    half, _ = _launch(path, root / "out_bf16", "--bf16", "--capaware-sweep-gammas", str(GAMMA),
                      "--capaware-sweep-policies", "drop")
    pipelined, _ = _launch(path, root / "out_pp2", "--pipeline-model-parallel-size", "2",
                           "--capaware-sweep-gammas", str(GAMMA), "--capaware-sweep-policies", "drop",
                           "--lm-eval-tasks", "tiny_choice", "--lm-eval-include-path", tasks, ep=1)
    return SimpleNamespace(path=path, root=root, results=results, printed=printed, reloaded=reloaded,
                           tensor_parallel=tensor_parallel, half=half, pipelined=pipelined)


def _hf(path, cfg=None, local_experts=()):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if cfg is not None:
        capped_reference(ARCH, model, cfg, local_experts)
    return model


def _local(rank, ep=EP):
    return range(rank * 8 // ep, (rank + 1) * 8 // ep)


def _reference_perplexity(path, cfg, dp=EP, ep=EP):
    """Data-parallel rank r holds windows r, r + dp, ...; each micro-batch is planned on its own,
    with the experts of r's EP rank local."""
    with open(SAMPLE) as handle:
        ids = torch.tensor(CharTokenizer(path).tokenize(handle.read()))
    windows = torch.stack([ids[w * SEQ : w * SEQ + SEQ + 1] for w in range(WINDOWS)])
    nll, count = 0.0, 0
    for rank in range(dp):
        model = _hf(path, cfg, _local(rank % ep, ep))
        for batch in windows[rank::dp].split(MICRO_BATCH):
            with torch.no_grad():
                logits = model(batch[:, :-1]).logits
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count), count


def _config(row):
    return None if row["gamma"] is None else CapacityConfig(row["gamma"], policy=row["policy"])


def test_perplexity_of_every_run_equals_the_hf_reference(example):
    path, results = example.path, example.results
    runs = results["runs"]
    assert [row["name"] for row in runs] == ["dropless", *(f"{p} g{GAMMA:g}" for p in POLICIES)]
    for row in runs:
        want, count = _reference_perplexity(path, _config(row))
        assert row["tokens"] == count == WINDOWS * SEQ
        assert row["perplexity"] == pytest.approx(want, rel=2e-5), row["name"]
    assert len({round(row["perplexity"], 2) for row in runs}) == len(runs), "every policy changes the model"


def test_generation_is_hf_greedy_decoding_with_its_kv_cache(example):
    """Both ranks run the same prompts and take rank 0's tokens: the reference plans with rank
    0's experts local; each HF decode step routes just the new tokens, as Megatron's does."""
    path, results = example.path, example.results
    tokenizer = CharTokenizer(path)
    prompts = [tokenizer.tokenize(text) for text in PROMPTS]
    width = min(map(len, prompts))
    prompts = torch.tensor([prompt[:width] for prompt in prompts])
    for row in results["runs"]:
        model = _hf(path, _config(row), _local(0))
        want = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        assert row["generated"] == want[:, width:].tolist(), row["name"]
        assert row["generated_text"][0] == tokenizer.detokenize(want[0, width:].tolist())


def test_load_statistics_tables_figures_and_lm_eval(example):
    root, results, printed = example.root, example.results, example.printed
    dropless, *capped = results["runs"]
    assert dropless["metrics"]["dropped_fraction"] == 0 and dropless["metrics"]["speedup_rank"] == 1
    drop = capped[0]["metrics"]
    assert 0 < drop["dropped_fraction"] < 1 and drop["rerouted_fraction"] == 0
    assert drop["straggler_expert_after"] < drop["straggler_expert_before"]
    assert capped[1]["metrics"]["rerouted_fraction"] > 0
    for row in results["runs"]:
        loads = torch.tensor(row["loads"]["before"])
        assert loads.shape == (2, 8)  # layers x experts, tokens per step summed over both ranks
        assert float(loads.sum()) == pytest.approx(WINDOWS * SEQ * 2 * 2)  # tokens x k x layers
        assert 0 <= row["lm_eval"]["tiny_choice/acc"] <= 1
    table = (root / "out" / "quality.md").read_text().splitlines()
    assert len(table) == 2 + len(results["runs"]) and "tiny_choice/acc" in table[0]
    assert "| dropless |" in printed and "EP2 DP2" in printed
    for name in ("load.png", "quality_vs_speedup.png"):
        assert (root / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_megatron_checkpoint_loads_at_another_expert_parallel_size(example):
    root, results, reloaded = example.root, example.results, example.reloaded
    assert [row["name"] for row in reloaded["runs"]] == ["dropless"]
    assert reloaded["runs"][0]["perplexity"] == pytest.approx(results["runs"][0]["perplexity"], rel=1e-6)
    assert reloaded["runs"][0]["generated"] == results["runs"][0]["generated"]
    assert (root / "megatron" / "latest_checkpointed_iteration.txt").exists()


def test_tensor_and_pipeline_parallel_runs_equal_the_hf_reference(example):
    """TP2 (ModelOpt shards the import), EP1, DP1: both TP ranks route every token of a
    micro-batch; without sequence parallelism each plans them all, as the reference does. PP2:
    each stage imports its layers, Megatron's schedule passes activations, the last stage sums;
    greedy tokens and lm-eval scores come from the last stage. Local-scope drop plans each EP
    rank's tokens alone, and both EP2 ranks run the same prompts and requests: the EP1 runs
    generate and score as the EP2 runs do."""
    path, results = example.path, example.results
    for runs in (example.tensor_parallel["runs"], example.pipelined["runs"]):
        assert [row["name"] for row in runs] == ["dropless", f"drop g{GAMMA:g}"]
        for row in runs:
            want, _ = _reference_perplexity(path, _config(row), dp=1, ep=1)
            assert row["perplexity"] == pytest.approx(want, rel=2e-5), row["name"]
    assert example.tensor_parallel["runs"][0]["generated"] == results["runs"][0]["generated"]
    for pipelined, whole in zip(example.pipelined["runs"], results["runs"][:2]):
        assert pipelined["generated"] == whole["generated"], pipelined["name"]
        assert pipelined["lm_eval"] == pytest.approx(whole["lm_eval"]), pipelined["name"]


def test_bf16_runs_close_to_fp32(example):
    """--bf16: ModelOpt imports bf16 weights, Megatron computes in bf16 (the router in fp32)."""
    results, half = example.results, example.half
    for fp32, bf16 in zip(results["runs"][:2], half["runs"]):
        assert bf16["name"] == fp32["name"]
        assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.02)
        assert bf16["perplexity"] != fp32["perplexity"]  # it did run in bf16


def _refused(path, *argv):
    done = subprocess.run([sys.executable, "-m", "capaware_megatron.megatron.run", SCRIPT, "--hf-path", path,
                           "--moe-token-dispatcher", "capaware", "--distributed-backend", "gloo", *argv],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode != 0
    return done.stderr


def test_bad_flags_are_refused_before_any_weight_is_read(example, tmp_path):
    path = example.path
    assert "--num-layers 3 disagrees with the checkpoint's 2" in _refused(path, "--num-layers", "3")
    assert "is not a Hugging Face checkpoint: no config.json" in _refused(str(tmp_path))
