"""lm-evaluation-harness on a Megatron-Core model with capaware MoE layers (extra ``lm-eval``).

    from capaware_megatron.lm_eval import MegatronLM, evaluate_tasks
    scores = evaluate_tasks(model, tokenizer, ["hellaswag", "arc_easy"], max_length=2048)

The paper reports its Table 1 with lm-eval; examples/hf_models/evaluate.py --lm-eval-tasks scores
tasks at every gamma of a sweep. lm-eval is imported lazily: importing this package needs only torch.
"""

__all__ = ["MegatronLM", "evaluate_tasks", "require_lm_eval"]


def require_lm_eval() -> None:
    """Raise ImportError naming the extra when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401 - only whether it imports
    except ImportError as err:
        raise ImportError("capaware_megatron.lm_eval needs lm-eval: pip install 'capaware_megatron[lm-eval]'") from err


def __getattr__(name: str):
    if name in ("MegatronLM", "evaluate_tasks"):
        require_lm_eval()
        from . import adapter

        return getattr(adapter, name)
    raise AttributeError(name)
