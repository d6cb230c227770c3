"""capaware_megatron.lm_eval: lm-evaluation-harness on a Megatron-Core model with capaware layers.

A tiny random Qwen3-MoE checkpoint with a character-level tokenizer (tests/hf_tiny.py), converted
and run in one gloo process. Every answer of the adapter is checked against the transformers model
itself: log-likelihoods (one request per forward and right-padded batches), rolling
log-likelihoods over several windows, greedy generation with stop sequences, and whole lm-eval
tasks made here (multiple choice, generation) scored end to end. Capped runs against the dense
capacity-aware HF reference (the loop planner on the HF gate), padding taking no capacity.
"""

import math

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("modelopt")

from hf_tiny import (  # noqa: E402
    GEN_CONTEXTS, GEN_TOKENS, LONG_TEXTS, PAIRS, UNTIL, CharTokenizer, capped_reference, make_checkpoint,
    save_char_tokenizer, write_lm_eval_tasks)

from capaware_megatron import CapacityConfig  # noqa: E402
from capaware_megatron.multiprocess import run_gloo  # noqa: E402

ARCH = "qwen3_moe"
MAX_LENGTH = 24
CAPPED = CapacityConfig(1.0, policy="drop")


def _instances(request_type, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=request_type, doc={}, arguments=args, idx=0) for args in arguments]


def _adapter_answers(rank, world_size, path, include_path):
    from megatron_harness import Layout, setup

    from capaware_megatron.hf import build_model, inspect_checkpoint
    from capaware_megatron.hf.evaluation import set_capacity
    from capaware_megatron.lm_eval import MegatronLM, evaluate_tasks

    setup(Layout(world_size=1))
    model = build_model(inspect_checkpoint(path), CapacityConfig(None))
    tokenizer = CharTokenizer(path)
    pairs = _instances("loglikelihood", PAIRS)
    answers = {}
    for label, cfg in (("dropless", CapacityConfig(None)), ("capped", CAPPED)):
        set_capacity(model, cfg)
        for batch_size in (1, 3):
            lm = MegatronLM(model, tokenizer, MAX_LENGTH, batch_size=batch_size)
            answers[(label, batch_size)] = lm.loglikelihood(pairs)
    set_capacity(model, CapacityConfig(None))
    lm = MegatronLM(model, tokenizer, MAX_LENGTH)
    answers["rolling"] = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in LONG_TEXTS]))
    answers["generated"] = lm.generate_until(_instances(
        "generate_until", [(c, {"until": UNTIL, "max_gen_toks": GEN_TOKENS, "do_sample": False}) for c in GEN_CONTEXTS]))
    answers["tasks"] = evaluate_tasks(model, tokenizer, ["tiny_choice", "tiny_gen"], MAX_LENGTH,
                                      batch_size=2, include_path=include_path)
    return answers


@pytest.fixture(scope="module")
def setting(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("lm_eval")
    path = make_checkpoint(ARCH, str(root / "model"))
    save_char_tokenizer(path)
    include_path = write_lm_eval_tasks(root)
    (answers,) = run_gloo(_adapter_answers, 1, path, include_path, timeout=600)
    return path, answers


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield patch


def _hf(path, capped=False, real=None):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if capped:
        capped_reference(ARCH, model, CAPPED, local_experts=range(8), real_tokens=real)
    return model


def _tokens(path, text):
    return CharTokenizer(path).tokenize(text)


def _reference_loglikelihood(model, rows, targets):
    """(sum log p(target), greedy) of each right-padded row, from the HF model's logits."""
    width = max(len(row) for row in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens).logits.float(), -1)
    out = []
    for i, (row, target) in enumerate(zip(rows, targets)):
        picked = log_probs[i, len(row) - len(target) : len(row)]
        expected = torch.tensor(target)
        out.append((float(picked.gather(1, expected[:, None]).sum()), bool((picked.argmax(-1) == expected).all())))
    return out


def _pair_rows(path):
    rows, targets = [], []
    for context, continuation in PAIRS:
        whole, ctx = _tokens(path, context + continuation), _tokens(path, context)
        rows.append(whole[:-1])
        targets.append(whole[len(ctx):])
    return rows, targets


def test_loglikelihood_equals_the_hf_model_one_by_one_and_batched(setting):
    path, answers = setting
    model = _hf(path)
    rows, targets = _pair_rows(path)
    expected = [_reference_loglikelihood(model, [row], [target])[0] for row, target in zip(rows, targets)]
    for batch_size in (1, 3):
        got = answers[("dropless", batch_size)]
        for (log_prob, greedy), (want, want_greedy) in zip(got, expected):
            assert log_prob == pytest.approx(want, abs=2e-4)
            assert greedy == want_greedy
    assert len({round(lp, 3) for lp, _ in expected}) == len(PAIRS)


def test_capped_loglikelihood_equals_the_capacity_aware_reference(setting):
    """Batch 1: the plan over one request's tokens. Batch 3, longest first, right-padded: the plan
    over the batch's real tokens only (padding takes no capacity)."""
    path, answers = setting
    rows, targets = _pair_rows(path)
    single = [_reference_loglikelihood(_hf(path, capped=True), [row], [target])[0]
              for row, target in zip(rows, targets)]
    dropless = answers[("dropless", 1)]
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(single, dropless)), "the cap must change answers"
    for (log_prob, _), (want, _) in zip(answers[("capped", 1)], single):
        assert log_prob == pytest.approx(want, abs=2e-4)
    order = sorted(range(len(PAIRS)), key=lambda i: -len(rows[i]) - 1)
    for start in range(0, len(order), 3):
        chunk = order[start : start + 3]
        width = max(len(rows[i]) for i in chunk)
        real = torch.tensor([[position < len(rows[i]) for position in range(width)] for i in chunk])
        batched = _reference_loglikelihood(_hf(path, capped=True, real=real), [rows[i] for i in chunk],
                                           [targets[i] for i in chunk])
        for i, (want, _) in zip(chunk, batched):
            assert answers[("capped", 3)][i][0] == pytest.approx(want, abs=2e-4)


def test_rolling_loglikelihood_scores_every_token_once(setting):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    path, answers = setting
    model = _hf(path)
    eod = CharTokenizer(path).eod
    for text, got in zip(LONG_TEXTS, answers["rolling"]):
        tokens = _tokens(path, text)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, eod, MAX_LENGTH, 1)]
        assert sum(len(target) for _, target in windows) == len(tokens)
        want = sum(_reference_loglikelihood(model, [(ctx + target)[:-1]], [target])[0][0] for ctx, target in windows)
        assert got == pytest.approx(want, abs=5e-4)
    assert len(_tokens(path, LONG_TEXTS[0])) > 2 * MAX_LENGTH, "several windows"


def _hf_greedy(model, path, context):
    tokenizer = CharTokenizer(path)
    tokens = _tokens(path, context)[-(MAX_LENGTH - GEN_TOKENS):]  # room for the new tokens, as lm-eval's HF model
    generated = []
    for _ in range(GEN_TOKENS):
        with torch.no_grad():
            token = int(model(torch.tensor([tokens + generated])).logits[0, -1].argmax())
        if token == tokenizer.eod:
            break
        generated.append(token)
    text = tokenizer.detokenize(generated)
    for stop in UNTIL:
        text = text.split(stop)[0]
    return text


def test_generate_until_is_hf_greedy_cut_at_the_stop(setting):
    path, answers = setting
    model = _hf(path)
    assert answers["generated"] == [_hf_greedy(model, path, context) for context in GEN_CONTEXTS]


def test_tasks_score_end_to_end(setting):
    """lm-eval's own task pipeline: the multiple-choice accuracy is the HF model's, choice by choice."""
    path, answers = setting
    model = _hf(path)
    correct = 0
    for context, continuation in PAIRS:
        scores = []
        for choice in (continuation, " xyz", " qq"):
            whole, ctx = _tokens(path, context + choice), _tokens(path, context)
            scores.append(_reference_loglikelihood(model, [whole[:-1]], [whole[len(ctx):]])[0][0])
        correct += int(max(range(3), key=scores.__getitem__) == 0)
    assert answers["tasks"]["tiny_choice/acc"] == pytest.approx(correct / len(PAIRS))
    expected_gen = [_hf_greedy(model, path, context) for context in GEN_CONTEXTS]
    assert answers["tasks"]["tiny_gen/exact_match"] == pytest.approx(
        sum(text.strip() == "x" for text in expected_gen) / len(GEN_CONTEXTS))
    assert math.isfinite(answers["tasks"]["tiny_choice/acc"])


def test_refuses_sampling_and_bad_sizes():
    from capaware_megatron.lm_eval.adapter import MegatronLM

    class Stub(torch.nn.Linear):
        config = type("C", (), {"tensor_model_parallel_size": 1, "sequence_parallel": False})()

    with pytest.raises(ValueError, match="max_length"):
        MegatronLM(Stub(1, 1), None, 1)
    with pytest.raises(ValueError, match="batch_size"):
        MegatronLM(Stub(1, 1), None, 8, batch_size=0)
    lm = MegatronLM(Stub(1, 1), type("T", (), {"eod": 0, "detokenize": lambda self, ids: ""})(), 8)
    with pytest.raises(ValueError, match="do_sample"):
        lm.generate_until(_instances("generate_until", [("a", {"do_sample": True, "until": ["."]})]))
