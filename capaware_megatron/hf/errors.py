"""The one error a checkpoint that cannot be served raises, before any weight is read."""


class CheckpointError(ValueError):
    """A path that is not a checkpoint, an unknown architecture, or a router the plan cannot serve."""
