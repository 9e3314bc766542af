"""The model-agnostic trainer: optimizer, loop, checkpoints, reporting."""
