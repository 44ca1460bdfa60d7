"""Engine glue: hooks (W&B tables, freeze schedules) and optim-wrapper constructors."""

from .checkpoint import AtomicCheckpointHook
from .wandb_logging import (
    GromaWandbVisBackend,
    GroundingLoggerHook,
    find_offline_runs,
    read_offline_run,
    resolve_wandb_mode,
)

__all__ = [
    "AtomicCheckpointHook",
    "GromaWandbVisBackend",
    "GroundingLoggerHook",
    "find_offline_runs",
    "read_offline_run",
    "resolve_wandb_mode",
]
