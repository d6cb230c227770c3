"""Bad checkpoints are refused by inspect_checkpoint with an error naming what is wrong, from
the config alone: no weight file is opened (the weights here are not even valid safetensors)."""

import json
import os

import pytest

pytest.importorskip("transformers")

from hf_tiny import _configs  # noqa: E402

from capaware_megatron.hf import CheckpointError, inspect_checkpoint  # noqa: E402


def _checkpoint(tmp_path, name="deepseek_v3", weights=True, **overrides):
    """A checkpoint folder with `name`'s config (overridden) and a weights file that is garbage."""
    config = _configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.save_pretrained(tmp_path)
    if weights:
        (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(tmp_path)


def test_a_good_config_is_accepted_without_reading_weights(tmp_path):
    checkpoint = inspect_checkpoint(_checkpoint(tmp_path))
    assert checkpoint.architecture.name == "DeepseekV3ForCausalLM"
    fields = checkpoint.transformer_fields
    assert fields["moe_router_score_function"] == "sigmoid" and fields["moe_router_enable_expert_bias"]
    assert fields["moe_layer_freq"] == [0, 1] and fields["moe_router_topk_scaling_factor"] == 2.5
    assert fields["moe_shared_expert_intermediate_size"] == 24


@pytest.mark.parametrize("case,overrides,match", [
    ("norm", dict(norm_topk_prob=False), "norm_topk_prob=False is not supported"),
    ("groups", dict(num_experts_per_tok=2), "num_experts_per_tok = 2 x topk_group"),
    ("act", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ("method", dict(topk_method="greedy"), "topk_method='greedy'"),
    ("rope", dict(rope_interleave=False), "rope_interleave=False"),
])
def test_a_router_or_attention_the_conversion_cannot_serve_is_refused(tmp_path, case, overrides, match):
    with pytest.raises(CheckpointError, match=match):
        inspect_checkpoint(_checkpoint(tmp_path, **overrides))


def test_sliding_window_attention_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="MixtralConfig.sliding_window=16"):
        inspect_checkpoint(_checkpoint(tmp_path, "mixtral", sliding_window=16))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        inspect_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(str(tmp_path))
    path = _checkpoint(tmp_path, weights=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no safetensors weights .*pytorch_model.bin"):
        inspect_checkpoint(path)


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    path = _checkpoint(tmp_path, "mixtral")
    with open(os.path.join(path, "config.json")) as handle:
        config = json.load(handle)
    config["architectures"] = ["PhimoeForCausalLM"]
    config["model_type"] = "phimoe"
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)
    with pytest.raises(CheckpointError, match="'PhimoeForCausalLM' is not supported; supported: "
                                              "MixtralForCausalLM, OlmoeForCausalLM, Qwen3MoeForCausalLM, DeepseekV3ForCausalLM"):
        inspect_checkpoint(path)


def test_olmoe_refuses_tensor_parallelism_before_building(tmp_path, monkeypatch):
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state

    from capaware_megatron.hf import build_model
    from capaware_megatron.megatron import is_installed

    checkpoint = inspect_checkpoint(_checkpoint(tmp_path, "olmoe"))
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    with pytest.raises(CheckpointError, match="OlmoeForCausalLM: its q_norm and k_norm span all attention heads"):
        build_model(checkpoint)
    assert not is_installed(), "a refused build leaves Megatron as it was"
