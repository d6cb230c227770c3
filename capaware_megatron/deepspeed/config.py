"""The "capacity_aware" section of a DeepSpeed config JSON, validated.

    "capacity_aware": {
        "capacity_factor": 1.5, "policy": "drop", "priority": "score", "scope": "local",
        "min_capacity": 0, "renormalize": false, "apply_in_training": false, "seed": 0,
        "backend": "auto", "max_tokens_per_rank": null,
        "log": {"interval": 10, "per_expert": false}
    }
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Union

from ..config import CapacityConfig

SECTION = "capacity_aware"
LOG_KEYS = {"interval": int, "per_expert": bool, "wandb": bool, "tensorboard": bool, "jsonl": (str, type(None))}
_JSON_TYPE_NAMES = {int: "an integer", bool: "true or false", (str, type(None)): "a string (a path) or null"}
_LOG_DEFAULTS = {"interval": 0, "per_expert": False, "wandb": True, "tensorboard": True, "jsonl": None}

DsConfig = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass(frozen=True)
class CapacityAwareSection:
    capacity: CapacityConfig
    log: Mapping[str, Any]


def load_ds_config(ds_config: DsConfig) -> Mapping[str, Any]:
    """A DeepSpeed config as a dict: a mapping, or the path of a JSON file."""
    if isinstance(ds_config, Mapping):
        return ds_config
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config, encoding="utf-8") as handle:
            try:
                config = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"DeepSpeed config {os.fspath(ds_config)!r} is not valid JSON: {err}") from err
        if not isinstance(config, Mapping):
            raise TypeError(
                f"DeepSpeed config {os.fspath(ds_config)!r} must hold a JSON object, got {type(config).__name__}"
            )
        return config
    raise TypeError(f"ds_config must be a dict or a JSON file path, got {type(ds_config).__name__}")


def parse_section(ds_config: DsConfig) -> CapacityAwareSection:
    """Validate the "capacity_aware" section; errors name the key and what is allowed."""
    config = load_ds_config(ds_config)
    if SECTION not in config:
        raise ValueError(f'the DeepSpeed config has no "{SECTION}" section')
    section = config[SECTION]
    if not isinstance(section, Mapping):
        raise TypeError(f'"{SECTION}" must be a JSON object, got {type(section).__name__}')
    allowed = set(CapacityConfig.field_names()) | {"log"}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(
            f'unknown key(s) {unknown} in "{SECTION}"; allowed: {", ".join(sorted(allowed))}'
        )
    fields = {k: v for k, v in section.items() if k != "log"}
    if fields.get("decode_capacity_factor") is not None:
        raise ValueError(
            f'"{SECTION}.decode_capacity_factor" applies to Megatron\'s CUDA-graph decode steps; '
            "DeepSpeed-MoE has no decode regime: use capacity_factor")
    try:
        capacity = CapacityConfig(**fields)
    except (TypeError, ValueError, OSError) as err:
        raise type(err)(f'"{SECTION}": {err}') from err
    return CapacityAwareSection(capacity, _parse_log(section.get("log", {})))


def _parse_log(log: Any) -> Mapping[str, Any]:
    if not isinstance(log, Mapping):
        raise TypeError(f'"{SECTION}.log" must be a JSON object, got {type(log).__name__}')
    unknown = sorted(set(log) - set(LOG_KEYS))
    if unknown:
        raise ValueError(
            f'unknown key(s) {unknown} in "{SECTION}.log"; allowed: {", ".join(sorted(LOG_KEYS))}'
        )
    parsed = {**_LOG_DEFAULTS, **log}
    for key, kind in LOG_KEYS.items():
        value = parsed[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(
                f'"{SECTION}.log.{key}" must be {_JSON_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}'
            )
    if parsed["interval"] < 0:
        raise ValueError(f'"{SECTION}.log.interval" must be >= 0, got {parsed["interval"]}')
    return parsed
