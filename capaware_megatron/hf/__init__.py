"""Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen3-MoE, DeepSeek-V3) in Megatron-Core, capaware.

    from capaware_megatron.hf import inspect_checkpoint, build_model
    checkpoint = inspect_checkpoint("/path/to/hf/model")     # config only, no weights read
    model = build_model(checkpoint, CapacityConfig(capacity_factor=1.5))

Weights move through NVIDIA ModelOpt's Megatron-Core importer (``import_mcore_gpt_from_hf``),
the converter Megatron-LM's own ``examples/post_training/modelopt/convert_model.py`` calls:
Megatron-Bridge, NVIDIA's other converter, imports Transformer Engine at module level and has no
CPU build (README, "Your own checkpoint"). transformers and ModelOpt are imported lazily: importing
this package needs only torch.
"""

from .architectures import ARCHITECTURES, Architecture
from .checkpoint import Checkpoint, CheckpointError, inspect_checkpoint

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Checkpoint",
    "CheckpointError",
    "build_model",
    "inspect_checkpoint",
    "require_hf",
]


def require_hf() -> None:
    """Raise ImportError naming the extra when transformers or ModelOpt is missing."""
    for module in ("transformers", "modelopt", "safetensors"):
        try:
            __import__(module)
        except ImportError as err:
            raise ImportError(
                f"capaware_megatron.hf needs {module}: pip install 'capaware_megatron[hf]'"
            ) from err


def __getattr__(name: str):
    if name == "build_model":
        from .convert import build_model

        return build_model
    raise AttributeError(name)
