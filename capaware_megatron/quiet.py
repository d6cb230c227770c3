"""Framework noise that does not concern a user of the demo, the benchmarks and the launchers.

Megatron-Core announces missing optional accelerators (Transformer Engine, Apex, absl) and its
GPTModel deprecation at import / build time, once per process. The CPU demo cannot use any of
them, so those exact messages are filtered where they are raised: warnings by message and
category, log records on the logger that emits them. Everything else still shows; ``--verbose``
in the scripts skips the filters. Worker processes started by ``run_gloo`` inherit the choice
through the environment.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

QUIET_ENV = "CAPAWARE_QUIET"
FRAMEWORK_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("absl.logging is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),  # Megatron's default cuda_graph_scope, unused here
)
"""(start of the message, category) of warnings that say an optional accelerator is missing, or
that a framework default the user did not choose is deprecated."""
FRAMEWORK_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
)
"""(logger, start of the message) of log records announcing framework deprecations."""


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_frameworks(verbose: bool = False) -> None:
    """Filter FRAMEWORK_WARNINGS and FRAMEWORK_LOG_RECORDS in this process and its workers."""
    os.environ[QUIET_ENV] = "0" if verbose else "1"
    if verbose:
        return
    for message, category in FRAMEWORK_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    for logger_name, prefix in FRAMEWORK_LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


def quiet_if_asked() -> None:
    """In a worker process: apply the filters when the parent asked for quiet runs."""
    if os.environ.get(QUIET_ENV) == "1":
        quiet_frameworks()
