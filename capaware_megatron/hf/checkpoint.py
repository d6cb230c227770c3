"""A Hugging Face checkpoint directory, checked from its config alone (no weight is read)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

from .architectures import ARCHITECTURES, Architecture, rope_theta
from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint the converter serves: its folder, HF config, architecture, Megatron fields."""

    path: str
    hf_config: Any
    architecture: Architecture
    transformer_fields: Dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.hf_config.max_position_embeddings

    @property
    def rotary_base(self) -> float:
        return rope_theta(self.hf_config)

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))


def _weight_files(path: str) -> list:
    return sorted(name for name in os.listdir(path)
                  if name.endswith(".safetensors") or name == "model.safetensors.index.json")


def inspect_checkpoint(path: str, require_weights: bool = True) -> Checkpoint:
    """Read and check `path`'s config.json (architecture, router, attention) and, unless the
    weights come from elsewhere (a Megatron checkpoint), that safetensors weights are there.
    Raises CheckpointError naming what is wrong; reads no weight."""
    from . import require_hf

    require_hf()
    import transformers

    if not os.path.isdir(path):
        raise CheckpointError(f"--hf-path {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"--hf-path {path!r} is not a Hugging Face checkpoint: no config.json")
    if require_weights and not _weight_files(path):
        found = ", ".join(sorted(os.listdir(path))) or "nothing"
        raise CheckpointError(
            f"--hf-path {path!r} has no safetensors weights (*.safetensors), found: {found}; "
            "convert .bin weights with transformers' save_pretrained(safe_serialization=True)")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"--hf-path {path!r}: config.json cannot be read: {err}") from err
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names or names[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"--hf-path {path!r}: architecture {names[0] if names else None!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}")
    architecture = ARCHITECTURES[names[0]]
    return Checkpoint(path, hf_config, architecture, architecture.transformer_fields(hf_config))
