"""Search strategies: grid (cartesian product), seeded random draws, and optuna's TPE through
ask/tell. Each proposes trial ``index``'s parameters (labels for categorical ones)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from typing import Any

from .spec import SweepSpec, SweepSpecError


class GridSearch:
    """The cartesian product of every parameter's categories, in spec order."""

    def __init__(self, spec: SweepSpec) -> None:
        self.names = [p.name for p in spec.parameters]
        self.points = list(itertools.product(*(p.labels for p in spec.parameters)))

    def propose(self, index: int) -> dict[str, Any]:
        """The parameters of trial ``index``."""
        return dict(zip(self.names, self.points[index], strict=True))

    def observe(self, params: Mapping[str, Any], value: float | None) -> None:
        """Records a trial finished in an earlier run of the sweep (nothing to do here)."""

    def tell(self, index: int, value: float | None) -> None:
        """Records the metric of a proposed trial (None: failed); nothing to do here."""


class RandomSearch(GridSearch):
    """Independent seeded draws; trial ``index`` always gets the same draw, so a resumed sweep
    proposes what the interrupted one did."""

    def __init__(self, spec: SweepSpec) -> None:
        self.parameters, self.seed = spec.parameters, spec.seed

    def propose(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{index}")  # str seeds hash deterministically
        return {p.name: p.sample(rng) for p in self.parameters}


class OptunaSearch(GridSearch):
    """Optuna's seeded TPE sampler through ask/tell; trials of an earlier run are added to the
    study first. Pending trials get the constant-liar treatment (``parallel > 1``)."""

    def __init__(self, spec: SweepSpec) -> None:
        try:
            import optuna  # optional: only this method needs it
        except ImportError as exc:
            raise SweepSpecError("method: optuna needs `pip install optuna`") from exc
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        dist = optuna.distributions
        self.distributions = {
            p.name: dist.CategoricalDistribution(p.labels)
            if p.labels is not None
            else (dist.IntDistribution if p.kind == "int" else dist.FloatDistribution)(
                p.low, p.high, log=p.log
            )
            for p in spec.parameters
        }
        # TPE needs a few random trials first; optuna's default (10) would leave a small sweep
        # entirely random.
        startup = min(10, max(1, spec.total_trials // 2))
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
        self.study = optuna.create_study(direction=spec.goal, sampler=sampler)
        self.pending: dict[int, Any] = {}

    def propose(self, index: int) -> dict[str, Any]:
        self.pending[index] = trial = self.study.ask(self.distributions)
        return dict(trial.params)

    def observe(self, params: Mapping[str, Any], value: float | None) -> None:
        state = self.optuna.trial.TrialState
        self.study.add_trial(
            self.optuna.trial.create_trial(
                params=dict(params),
                distributions=self.distributions,
                value=value,
                state=state.FAIL if value is None else state.COMPLETE,
            )
        )

    def tell(self, index: int, value: float | None) -> None:
        state = self.optuna.trial.TrialState
        trial = self.pending.pop(index)
        if value is None:
            self.study.tell(trial, state=state.FAIL)
        else:
            self.study.tell(trial, value)


def make_search(spec: SweepSpec) -> GridSearch:
    """The search strategy of ``spec.method``."""
    return {"grid": GridSearch, "random": RandomSearch, "optuna": OptunaSearch}[spec.method](spec)
