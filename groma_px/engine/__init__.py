"""Engine glue: hooks (W&B tables, freeze schedules) and optim-wrapper constructors."""
