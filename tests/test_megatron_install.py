"""install()/uninstall(): idempotent, reversible; clear errors without megatron-core."""

import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

import capaware_megatron.megatron as capaware  # noqa: E402


def test_install_is_idempotent_and_reversible():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    stock_init = MoELayer.__init__
    was_installed = capaware.is_installed()
    capaware.uninstall()
    assert MoELayer.__init__ is stock_init or was_installed
    stock_init = MoELayer.__init__
    with capaware.installed():
        patched = MoELayer.__init__
        assert patched is not stock_init and patched.__wrapped__ is stock_init
        capaware.install()
        assert MoELayer.__init__ is patched
    assert MoELayer.__init__ is stock_init
    if was_installed:
        capaware.install()


def test_without_install_megatron_rejects_the_type():
    code = """
import warnings; warnings.filterwarnings("ignore")
import torch
from capaware_megatron.megatron import cpu_shims; cpu_shims.apply()
from megatron.core import parallel_state
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
parallel_state.initialize_model_parallel()
import sys; sys.path.insert(0, "tests")
import megatron_harness as mh
try:
    mh.moe_layer(mh.Layout(world_size=1), "capaware")
except ValueError as err:
    print("REJECTED", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "REJECTED Unsupported token dispatcher type: capaware" in out.stdout, out.stderr[-2000:]


def test_missing_megatron_core_names_the_extra():
    code = """
import sys
sys.modules["megatron"] = None  # as if megatron-core were not installed
import capaware_megatron.megatron as capaware
try:
    capaware.install()
except ImportError as err:
    print("IMPORT ERROR:", err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "capaware_megatron[megatron]" in out.stdout, out.stdout + out.stderr


def test_unsupported_megatron_version(monkeypatch):
    from megatron.core import package_info

    from capaware_megatron.megatron._compat import require_megatron_core

    monkeypatch.setattr(package_info, "MINOR", 14)
    monkeypatch.setattr(package_info, "__shortversion__", "0.14.0")
    with pytest.raises(ImportError, match="supports megatron-core 0.19.x, found 0.14.0"):
        require_megatron_core()


def test_conflict_detected_when_building_in_code():
    from capaware_megatron.megatron.config import capacity_config_of

    class Config:
        moe_expert_capacity_factor = 1.0

    with pytest.raises(ValueError, match="moe_expert_capacity_factor=1.0"):
        capacity_config_of(Config())

    class InferenceOptimized:  # MoELayer would swap the dispatcher out at every forward
        transformer_impl = "inference_optimized"

    with pytest.raises(ValueError, match="would bypass the capaware plan"):
        capacity_config_of(InferenceOptimized())


SMALL = dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_moe_experts=8, moe_router_topk=2,
             moe_ffn_hidden_size=24, use_cpu_initialization=True, add_bias_linear=False)
ALLTOALL_OPTIONS = {  # options Megatron's config checks accept only for "alltoall" (and "flex")
    "shared-expert overlap": dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_overlap=True),
    "EP communication overlap": dict(overlap_moe_expert_parallel_comm=True, expert_model_parallel_size=2,
                                     bf16=True),
}


def _config_outcome(dispatcher, options):
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        config = TransformerConfig(moe_token_dispatcher_type=dispatcher, **SMALL, **options)
    except (ValueError, AssertionError) as err:
        return f"refused: {err}"
    return f"accepted as {config.moe_token_dispatcher_type}"


@pytest.mark.parametrize("name", ALLTOALL_OPTIONS)
def test_every_alltoall_option_is_a_capaware_option(name):
    with capaware.installed():
        alltoall = _config_outcome("alltoall", ALLTOALL_OPTIONS[name])
        ours = _config_outcome("capaware", ALLTOALL_OPTIONS[name])
    assert ours == alltoall.replace("accepted as alltoall", "accepted as capaware"), (alltoall, ours)
    if name == "shared-expert overlap":
        assert ours == "accepted as capaware"


def test_capacity_config_survives_every_config_copy():
    import copy
    import dataclasses
    import pickle

    from megatron.core.transformer.transformer_config import TransformerConfig

    from capaware_megatron import CapacityConfig
    from capaware_megatron.megatron.config import capacity_config_of

    cfg = CapacityConfig(1.5, policy="reroute")
    with capaware.installed():
        config = TransformerConfig(moe_token_dispatcher_type="capaware", **SMALL)
        capaware.set_capacity_config(config, cfg)
        copies = [dataclasses.replace(config, num_layers=4), copy.copy(config), copy.deepcopy(config),
                  pickle.loads(pickle.dumps(config))]
    for derived in copies:
        assert derived.moe_token_dispatcher_type == "capaware"
        assert capacity_config_of(derived) == cfg
    with pytest.raises(ValueError, match="needs moe_token_dispatcher_type='capaware', got 'alltoall'"):
        capaware.set_capacity_config(dataclasses.replace(config, moe_token_dispatcher_type="alltoall"), cfg)


def _layer_from_a_replaced_config(rank, world_size):
    import dataclasses

    import megatron_harness as mh
    import torch

    from capaware_megatron import CapacityConfig

    layout = mh.Layout(world_size=1)
    mh.setup(layout)
    config = mh.transformer_config(layout, "capaware")
    capaware.set_capacity_config(config, CapacityConfig(0.5))
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=mh.EXPERTS, moe_grouped_gemm=False)
    layer = spec.submodules.mlp(config=dataclasses.replace(config, moe_ffn_hidden_size=mh.FFN))
    dispatcher = layer.token_dispatcher
    hidden = mh.local_input(64, seed=0, requires_grad=False)
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
        in_training = dispatcher.plan(routing_map, probs)  # a new layer trains: no cap
        layer.eval()
        layer(hidden)
        capped = dispatcher.last_plan
    return (dispatcher.capacity_config, int(in_training.num_dropped), int(capped.num_dropped),
            dispatcher.training)


def test_layer_from_a_derived_config_caps_and_starts_in_training_mode():
    from capaware_megatron import CapacityConfig
    from capaware_megatron.multiprocess import run_gloo

    cfg, dropped_in_training, dropped_in_eval, training_after_eval = run_gloo(_layer_from_a_replaced_config, 1)[0]
    assert cfg == CapacityConfig(0.5)
    assert dropped_in_training == 0 and dropped_in_eval > 0 and not training_after_eval


def test_capacity_with_a_captured_preprocess_step_is_refused():
    from types import SimpleNamespace

    from megatron.core.transformer.enums import CudaGraphModule

    from capaware_megatron import CapacityConfig
    from capaware_megatron.megatron.dispatcher import _check_graph_capture

    captured = SimpleNamespace(cuda_graph_modules=[CudaGraphModule.moe_router, CudaGraphModule.moe_preprocess])
    with pytest.raises(ValueError, match="moe_preprocess, which is not supported with a capaware capacity"):
        _check_graph_capture(captured, CapacityConfig(1.0))
    _check_graph_capture(captured, CapacityConfig(None))  # dropless: nothing to size
    _check_graph_capture(SimpleNamespace(cuda_graph_modules=[CudaGraphModule.moe_router]), CapacityConfig(1.0))


def test_runtime_alltoall_checks_see_capaware_as_alltoall():
    """Megatron code outside the config checks that tests the string "alltoall": the EP-overlap
    schedule's memory frees (one local expert: the MLP input must be kept for backward)."""
    from megatron.core.models.common import utils as common_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    with capaware.installed():
        for num_local_experts in (1, 4):
            decisions = {
                dispatcher: common_utils.should_free_input(
                    "mlp", True, TransformerConfig(moe_token_dispatcher_type=dispatcher, **SMALL),
                    num_local_experts)
                for dispatcher in ("alltoall", "capaware")
            }
            assert decisions["capaware"] == decisions["alltoall"], (num_local_experts, decisions)
    assert common_utils.should_free_input("mlp", True, TransformerConfig(
        moe_token_dispatcher_type="capaware", **SMALL), 1), "uninstalled: Megatron's own answer"


def _transformer_layer_build(rank, world_size):
    import megatron_harness as mh
    from megatron.core.transformer import transformer_layer

    seen = []
    set_offload_modules = transformer_layer.TransformerLayer._set_offload_modules

    def recording(self):  # runs in TransformerLayer.__init__, after the MLP is built
        seen.append((self.config.moe_token_dispatcher_type, type(self.mlp.token_dispatcher).__name__))
        return set_offload_modules(self)

    transformer_layer.TransformerLayer._set_offload_modules = recording
    layout = mh.Layout(world_size=1)
    mh.setup(layout)
    model = mh.gpt_model(layout, "capaware")
    return seen, [layer.config.moe_token_dispatcher_type for layer in model.decoder.layers]


def test_transformer_layer_sees_alltoall_while_its_moe_layer_is_capaware():
    """TransformerLayer.__init__ tests "alltoall" for its CUDA-graph recompute choice."""
    from capaware_megatron.multiprocess import run_gloo

    seen, after = run_gloo(_transformer_layer_build, 1)[0]
    assert seen == [("alltoall", "CapacityAwareTokenDispatcher")] * 2
    assert after == ["capaware", "capaware"]


def test_dynamic_inference_contexts_hand_the_dispatcher_their_step_counts():
    """install() wraps DynamicInferenceContext.__init__: each context binds its real token count
    (padding rows take no capacity) and its most tokens per step (the eager global bound). The
    context needs CUDA to build, so a stand-in runs the wrapper; Megatron's own source is held to
    the attributes it reads."""
    import inspect
    from types import SimpleNamespace

    import torch
    from megatron.core.inference.contexts import dynamic_context

    import importlib

    from capaware_megatron.megatron.dispatcher import CapacityAwareTokenDispatcher as Dispatcher

    source = inspect.getsource(dynamic_context.DynamicInferenceContext)
    assert "self.gpu_view.real_token_count" in source and "self.max_tokens =" in source
    assert "def round_up_tokens" in source
    with capaware.installed():
        assert dynamic_context.DynamicInferenceContext.__init__.__wrapped__ is not None
    count = torch.tensor([3], dtype=torch.int32)

    class Context:
        def __init__(self):
            self.gpu_view = SimpleNamespace(real_token_count=count)
            self.max_tokens = 100

        def round_up_tokens(self, tokens):
            return -(-tokens // 64) * 64

    try:
        context = Context.__new__(Context)
        install_module = importlib.import_module("capaware_megatron.megatron.install")
        install_module._binding_inference_context(Context.__init__)(context)
        assert Dispatcher.real_token_count is count and Dispatcher.inference_max_tokens == 128
        with pytest.raises(ValueError, match="one-element integer tensor"):
            Dispatcher.set_real_token_count_tensor(torch.zeros(2))
    finally:
        Dispatcher.set_real_token_count_tensor(None)
        Dispatcher.inference_max_tokens = None


def _inference_bound_of_a_global_layer(rank, world_size):
    import megatron_harness as mh
    from megatron.core.inference.utils import InferenceMode, set_decode_expert_padding

    from capaware_megatron import CapacityConfig
    from capaware_megatron.megatron.dispatcher import CapacityAwareTokenDispatcher as Dispatcher

    mh.setup(mh.Layout(world_size=1))
    layer = mh.moe_layer(mh.Layout(world_size=1), "capaware", CapacityConfig(1.0, scope="global")).eval()
    own = mh.moe_layer(mh.Layout(world_size=1), "capaware",
                       CapacityConfig(1.0, scope="global", max_tokens_per_rank=32)).eval()
    Dispatcher.inference_max_tokens = 128
    try:
        outside = layer.token_dispatcher.step_config.max_tokens_per_rank
        with InferenceMode.active():
            inside = layer.token_dispatcher.step_config.max_tokens_per_rank
            kept = own.token_dispatcher.step_config.max_tokens_per_rank
            set_decode_expert_padding(layer, True, capacity_factor=mh.EXPERTS / mh.TOPK)
            padded = layer.token_dispatcher.step_config.max_tokens_per_rank
    finally:
        Dispatcher.inference_max_tokens = None
    return outside, inside, kept, padded


def test_eager_global_inference_steps_take_the_engines_bound():
    from capaware_megatron.multiprocess import run_gloo

    # Outside inference: none; eager inference: the engine's; a layer's own bound wins; padded
    # decode plans a static token count and needs none.
    assert run_gloo(_inference_bound_of_a_global_layer, 1) == [(None, 128, 32, None)]
