"""Weights & Biases logging: the vis backend, the grounding logger hook, an offline-run reader."""

from .backend import GromaWandbVisBackend, resolve_wandb_mode, wandb_logged_in
from .hook import GroundingLoggerHook, example_row, wandb_runs
from .reader import find_offline_runs, logged_table, read_offline_run

__all__ = [
    "GromaWandbVisBackend",
    "GroundingLoggerHook",
    "example_row",
    "find_offline_runs",
    "logged_table",
    "read_offline_run",
    "resolve_wandb_mode",
    "wandb_logged_in",
    "wandb_runs",
]
