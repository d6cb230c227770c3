"""lm-eval's TemplateLM over a Megatron-Core GPTModel: log-likelihoods, rolling log-likelihoods
and greedy generation through the model's own forward (its capaware layers plan every batch).

Every rank of the model's parallel group evaluates every request (lm-eval sees one process:
rank 0 of 1), so the expert- and tensor-parallel collectives of all ranks pair up; requests are
not split over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..hf.evaluation import causal_mask, forward_reduced, greedy_tokens


class MegatronLM(TemplateLM):
    """lm-eval model of a built Megatron-Core GPTModel and Megatron's tokenizer.

    Args:
        model: the GPTModel (this rank's shards), in eval mode.
        tokenizer: Megatron's tokenizer (``tokenize``, ``detokenize``, ``eod``), e.g.
            megatron.training.get_tokenizer().
        max_length: the longest sequence one forward sees (context + continuation).
        batch_size: requests per log-likelihood forward (right-padded; padding is masked out of
            MoE routing, so it takes no capacity).
        max_gen_toks: tokens generated when a task names no limit.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, batch_size: int = 1,
                 max_gen_toks: int = 256) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self._device = next(model.parameters()).device
        config = model.config
        self._length_multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(tokens))

    def _scored(self, sequences: list[list[int]]) -> torch.Tensor:
        """[2, B, S] float32 of right-padded `sequences` (a forward's inputs, then the last
        label; S: the longest inputs): each next-token label's log-probability, and 1 where it is
        the greedy token. Reduced on the last pipeline stage (forward_reduced), so no [B, S, V]
        tensor crosses ranks."""
        width = max(len(sequence) for sequence in sequences) - 1
        width = -(-width // self._length_multiple) * self._length_multiple
        tokens = torch.full((len(sequences), width + 1), self.eot_token_id, dtype=torch.long)
        padding = torch.ones(len(sequences), width, dtype=torch.bool)
        for index, sequence in enumerate(sequences):
            tokens[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            padding[index, : len(sequence) - 1] = False
        tokens, padding = tokens.to(self._device), padding.to(self._device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]

        def score(logits: torch.Tensor) -> torch.Tensor:
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            picked = log_probs.gather(-1, labels[..., None])[..., 0]
            return torch.stack([picked, (log_probs.argmax(-1) == labels).float()])

        with torch.no_grad():
            return forward_reduced(self.model, inputs, causal_mask(width, self._device), score,
                                   like=padding.new_empty((2, *padding.shape), dtype=torch.float32),
                                   padding_mask=padding)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding yields it) per
        ((context, continuation), context tokens, continuation tokens); longest first, batched."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            sequences, scored_lengths = [], []
            for index in chunk:
                _, context, continuation = requests[index]
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                sequences.append(whole)
                scored_lengths.append(min(len(continuation), len(whole) - 1))
            scored = self._scored(sequences)
            for row, (index, sequence, scored_length) in enumerate(zip(chunk, sequences, scored_lengths)):
                picked = scored[:, row, len(sequence) - 1 - scored_length : len(sequence) - 1]
                # One host read per request: lm-eval takes Python floats (evaluation, not a hot path).
                answer = (float(picked[0].sum()), bool(picked[1].all()))
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each string's log-likelihood in max_length windows, every token predicted once with
        the most context (lm-eval's own rolling windows)."""
        totals = []
        for request in requests:
            (string,) = request.args
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, 1)]
            scored = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            total = sum(log_prob for log_prob, _ in scored)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, stopped at the first stop sequence (or end of text), KV-cached."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"generate_until: do_sample {kwargs['do_sample']!r}: MegatronLM "
                                 "decodes greedily only; set do_sample false")
            until = handle_stop_sequences(kwargs.get("until"), eos=self.tok_decode([self.eot_token_id]))
            budget = min(kwargs["max_gen_toks"], self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - budget):]
            text = _greedy_until(self, prompt, budget, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs


def _greedy_until(lm: MegatronLM, prompt: list[int], budget: int, until: Iterable[str]) -> str:
    """Greedy text after `prompt`, cut before the first of `until`."""
    generated: list[int] = []
    text = ""
    steps = greedy_tokens(lm.model, torch.tensor([prompt], dtype=torch.long), budget)
    with contextlib.closing(steps):
        for token in steps:
            token = int(token[0])  # the stop test reads the text on the host
            if token == lm.eot_token_id:
                break
            generated.append(token)
            text = lm.tok_decode(generated)
            if any(stop in text for stop in until):
                break
    for stop in until:
        text = text.split(stop)[0]
    return text


def evaluate_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], max_length: int,
                   batch_size: int = 1, include_path: Optional[str] = None,
                   limit: Optional[float] = None, num_fewshot: Optional[int] = None) -> dict[str, float]:
    """{"task/metric": value} of lm-eval `tasks` (names, or tasks of `include_path`'s YAMLs) on
    `model` as it is configured now (its capaware layers' CapacityConfig), on every rank."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=MegatronLM(model, tokenizer, max_length, batch_size), tasks=list(tasks),
        num_fewshot=num_fewshot, limit=limit, task_manager=TaskManager(include_path=include_path),
        log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    # lm-eval returns results on LOCAL_RANK 0 only (every rank computed them): global rank 0's go to all.
    scores = None if results is None else _flat_scores(results["results"])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    return scores


def _flat_scores(results: dict) -> dict[str, float]:
    """{"task/metric": value} of lm-eval's results (stderr and non-numbers left out)."""
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                scores[f"{task}/{key.split(',')[0]}"] = float(value)
    return scores
