"""Ablation sweeps over config presets and scalars: a YAML spec, grid/random/optuna search,
trials run as local subprocesses (several at once; each a W&B run in the sweep's group), a
results table (CSV + markdown) and the equivalent W&B sweep config. ``tools/sweep.py`` is the
command line; ``docs/sweeps.md`` the guide.

A trial runs in its own process (``python -m groma_px.engine.sweep TRIAL_DIR``), so a crash
is isolated; it reads ``TRIAL_DIR/trial.json`` and writes ``TRIAL_DIR/result.json``, whose
presence marks it finished when the sweep is run again.
"""

from .executor import Sweep
from .results import metric_value, write_results
from .search import GridSearch, OptunaSearch, RandomSearch, make_search
from .spec import (
    Parameter,
    SweepSpec,
    SweepSpecError,
    load_spec,
    parse_assignments,
    wandb_sweep_config,
)
from .trial import build_trial_config, execute_trial, trial_options

__all__ = [
    "GridSearch",
    "OptunaSearch",
    "Parameter",
    "RandomSearch",
    "Sweep",
    "SweepSpec",
    "SweepSpecError",
    "build_trial_config",
    "execute_trial",
    "load_spec",
    "make_search",
    "metric_value",
    "parse_assignments",
    "trial_options",
    "wandb_sweep_config",
    "write_results",
]
