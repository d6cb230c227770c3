"""Tiny random-weight Hugging Face MoE checkpoints made from transformers configs (no download).

Weights are drawn with a large initializer range so the experts, not the residual stream, move
the logits: a wrong expert, weight or routing decision shows in the outputs.
"""

from __future__ import annotations

import json

import torch

VOCAB, EXPERTS, SEQ = 96, 8, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=SEQ, initializer_range=0.3, tie_word_embeddings=False)


def _configs():
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=24, num_key_value_heads=2,
                                    num_local_experts=EXPERTS, num_experts_per_tok=2),
        "olmoe": tf.OlmoeConfig(**COMMON, intermediate_size=24, num_key_value_heads=2,
                                num_experts=EXPERTS, num_experts_per_tok=2),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                       num_key_value_heads=2, head_dim=8, num_experts=EXPERTS,
                                       num_experts_per_tok=2, norm_topk_prob=True),
        # n_group 4 x 4 experts, topk_group 2, k 4 (DeepSeek-V3's k = 2 x topk_group): a token's
        # two groups hold 8 experts, 4 of them not picked, so reroute and expanded have somewhere
        # to go inside the group limit. One shared expert, a dense first layer, q LoRA; the
        # correction bias drawn large so that it changes which experts are picked (a
        # bias-shifted score would then show in the plan).
        "deepseek_v3": tf.DeepseekV3Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=24, num_key_value_heads=4,
            n_routed_experts=2 * EXPERTS, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
            topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
            rope_scaling=None),
    }


ARCHITECTURES = ("mixtral", "olmoe", "qwen3_moe", "deepseek_v3")


def make_checkpoint(name: str, path: str, seed: int = 0, **config_overrides) -> str:
    """Save a tiny random `name` model (one of ARCHITECTURES) under `path`."""
    import transformers

    config = _configs()[name]
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.5)
    model.save_pretrained(path)
    return path


def hf_logits(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S, V] logits of the transformers model itself."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def as_router_weighs(name: str, hf_config, logits: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E] each expert's weight as the HF gate would weigh it had it picked it, from the gate's
    own code: Mixtral and Qwen3-MoE (norm_topk_prob) renormalise the softmax over the picks,
    OLMoE (no norm_topk_prob) takes it as it is, DeepSeek-V3 renormalises the bias-free sigmoid,
    times routed_scaling_factor."""
    logits = logits.float()
    if name == "deepseek_v3":
        scores = logits.sigmoid()
        picked = (scores * routing_map).sum(-1, keepdim=True) + 1e-20
        return scores / picked * hf_config.routed_scaling_factor
    probs = torch.softmax(logits, -1)
    if name in ("olmoe", "qwen3_moe") and not hf_config.norm_topk_prob:
        return probs
    return probs / (probs * routing_map).sum(-1, keepdim=True)


def group_mask(hf_config, routing_map: torch.Tensor) -> torch.Tensor:
    """[T, E]: DeepSeek-V3's experts in the groups that hold one of a token's picks."""
    groups = hf_config.n_group
    in_group = routing_map.view(routing_map.shape[0], groups, -1).any(-1)
    return in_group.repeat_interleave(routing_map.shape[1] // groups, dim=1)


def capped_reference(name: str, model, cfg, local_experts, real_tokens=None) -> None:
    """Replace every sparse MoE block's forward of the HF `model` by a dense capacity-aware one:
    the HF gate's own picks and weights, the loop reference planner (tests/reference.py), every
    expert applied with its planned weight through the HF experts module, shared experts
    (DeepSeek-V3) added for every token, uncapped. `real_tokens` [B, S] bool: only those are
    planned (padding takes no capacity; its rows get no routed output)."""
    from reference import reference_plan

    hf_config = model.config
    for layer in model.model.layers:
        block = layer.mlp
        if not hasattr(block, "gate"):
            continue  # a dense layer

        def forward(hidden, block=block):
            flat = hidden.reshape(-1, hidden.shape[-1])
            keep = (torch.ones(flat.shape[0], dtype=torch.bool) if real_tokens is None
                    else real_tokens.reshape(-1))
            logits, weights, indices = block.gate(flat[keep])
            routing_map = torch.zeros(logits.shape, dtype=torch.bool).scatter(1, indices, True)
            probs = torch.zeros(logits.shape).scatter(1, indices, weights.float())
            scores = torch.where(routing_map, probs, as_router_weighs(name, hf_config, logits, routing_map))
            eligible = group_mask(hf_config, routing_map) if name == "deepseek_v3" else None
            new_map, new_probs, _ = reference_plan(
                scores, routing_map, cfg, local_experts=local_experts, probs=probs, eligible=eligible)
            every = torch.arange(logits.shape[1]).expand(logits.shape[0], -1)
            routed = torch.zeros_like(flat)
            routed[keep] = block.experts(flat[keep], every, new_probs.to(flat.dtype))
            out = routed.view_as(hidden)
            if getattr(block, "shared_experts", None) is not None:
                out = out + block.shared_experts(hidden)
            return out

        block.forward = forward


def save_char_tokenizer(path: str) -> None:
    """A character-level tokenizer of the VOCAB - 1 printable ASCII characters (any whitespace
    reads as a space) and <unk>, saved as a transformers fast tokenizer under `path`."""
    import tokenizers
    import transformers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

    vocab = {chr(32 + i): i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(Regex(r"\s"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<unk>").save_pretrained(path)


# lm-eval requests and tasks of the tests (character-level tokens).
# (context, continuation): distinct lengths, so the batching order (longest first) is known.
PAIRS = [("The cat sat on", " the mat"), ("Down, down,", " down"), ("Alice", " was"),
         ("Oh dear! I shall", " be late!"), ("a b", " c d e f"), ("Curiouser and", " curiouser")]
LONG_TEXTS = ["So she was considering in her own mind, as well as she could, whether the pleasure",
              "It was all very well to say drink me."]
GEN_CONTEXTS = ["Alice was beginning to", "There was"]  # the first longer than a prompt may be (test_lm_eval)
UNTIL = [" ", "."]
GEN_TOKENS = 8


class CharTokenizer:
    """Megatron's tokenizer interface (tokenize, detokenize, eod) over the HF tokenizer."""

    def __init__(self, path):
        import transformers

        self._hf = transformers.AutoTokenizer.from_pretrained(path)
        self.eod = self._hf.eos_token_id

    def tokenize(self, text):
        return self._hf(text)["input_ids"]

    def detokenize(self, ids):
        return self._hf.decode(ids)


def write_lm_eval_tasks(root) -> str:
    """Two lm-eval tasks on local JSON files under `root` (a pathlib.Path): tiny_choice (multiple
    choice over PAIRS) and tiny_gen (generation from GEN_CONTEXTS until UNTIL); returns the folder."""
    choice = [{"question": context, "choices": [cont, " xyz", " qq"], "answer": 0} for context, cont in PAIRS]
    gen = [{"prompt": context, "target": "x"} for context in GEN_CONTEXTS]
    for name, rows in (("choice", choice), ("gen", gen)):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    (root / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/choice.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/gen.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return str(root)
