"""The sweep spec: its YAML fields, validation with errors that name the field, the parameters
(categorical ``values``, named ``choices``, ``min``/``max`` ranges), and the equivalent W&B sweep
config. ``docs/sweeps.md`` describes every field."""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
METHODS = {"grid": "grid", "random": "random", "optuna": "bayes"}  # ours -> W&B's
# fmt: off
SPEC_FIELDS = ("name", "config", "base_options", "parameters", "method", "num_trials", "seed",
               "metric", "parallel", "wandb", "data", "validate", "trial_timeout")
PARAM_FIELDS = ("values", "choices", "min", "max", "log", "type")
METRIC_FIELDS = ("name", "goal", "report")
WANDB_FIELDS = ("project", "group", "mode")
DATA_FIELDS = ("num_train", "num_val", "num_test", "seed", "num_region_tokens", "data_root",
               "tokenizer_dir")
# fmt: on
DATA_DEFAULTS = {"num_train": 32, "num_val": 4, "num_test": 8, "seed": 0, "num_region_tokens": 16}
SCALARS = (str, int, float, bool, type(None))


class SweepSpecError(ValueError):
    """An invalid sweep spec; the message starts with the offending field."""


def _check_fields(raw: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SweepSpecError(f"{where}: unknown field {key!r}{hint} (allowed: {allowed})")


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepSpecError(f"{where}: expected a number, got {value!r}")
    return value


@dataclass(frozen=True)
class Parameter:
    """One swept dimension: categorical ``values`` of a cfg-option key, named ``choices`` (each
    a dict of cfg-options; the name is then free), or a ``low``-``high`` range of a key."""

    name: str
    values: tuple | None = None
    choices: dict[str, dict[str, Any]] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    kind: str = "float"  # of a range: "int" or "float"

    @property
    def labels(self) -> list | None:
        """The categories (values or choice names); None for a range."""
        if self.choices is not None:
            return list(self.choices)
        return None if self.values is None else list(self.values)

    def options(self, value: Any) -> dict[str, Any]:
        """The cfg-options that set this parameter to ``value`` (a label for choices)."""
        return dict(self.choices[value]) if self.choices is not None else {self.name: value}

    def sample(self, rng: random.Random) -> Any:
        """A uniform (log-uniform with ``log``) draw."""
        if self.labels is not None:
            return rng.choice(self.labels)
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        x = rng.uniform(lo, hi)
        x = math.exp(x) if self.log else x
        return (
            min(max(round(x), int(self.low)), int(self.high)) if self.kind == "int" else round(x, 6)
        )

    def parse(self, text: str) -> Any:
        """The value a command-line ``name=text`` (e.g. from ``wandb agent``) stands for."""
        if self.labels is not None:
            for label in self.labels:
                if text in (str(label), yaml.safe_dump(label).strip().removesuffix("...").strip()):
                    return label
            raise ValueError(f"{self.name}={text}: not one of {self.labels}")
        value = (int if self.kind == "int" else float)(float(text))
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name}={text}: outside [{self.low}, {self.high}]")
        return value

    def wandb(self) -> dict[str, Any]:
        """This parameter in a W&B sweep config."""
        if self.labels is not None:
            return {"values": self.labels}
        dist = {
            ("int", False): "int_uniform",
            ("float", False): "uniform",
            ("int", True): "q_log_uniform_values",
            ("float", True): "log_uniform_values",
        }
        out = {"distribution": dist[self.kind, self.log], "min": self.low, "max": self.high}
        return {**out, "q": 1} if self.kind == "int" and self.log else out


def _parse_parameter(name: str, raw: Any) -> Parameter:
    where = f"parameters.{name}"
    if isinstance(raw, list):  # shorthand: `key: [a, b]`
        raw = {"values": raw}
    if not isinstance(raw, Mapping):
        raise SweepSpecError(f"{where}: expected values:, choices: or min:/max:, got {raw!r}")
    _check_fields(raw, PARAM_FIELDS, where)
    is_range = "min" in raw or "max" in raw
    if ("values" in raw) + ("choices" in raw) + is_range != 1:
        raise SweepSpecError(f"{where}: give exactly one of values:, choices:, min:/max:")
    if not is_range and {"log", "type"} & set(raw):
        raise SweepSpecError(f"{where}: log:/type: belong to a min:/max: range")
    if "values" in raw:
        values = raw["values"]
        if not isinstance(values, list) or not values:
            raise SweepSpecError(f"{where}.values: expected a non-empty list")
        if not all(isinstance(v, SCALARS) for v in values):
            raise SweepSpecError(f"{where}.values: only scalars; name dicts/lists with choices:")
        if len({repr(v) for v in values}) != len(values):
            raise SweepSpecError(f"{where}.values: duplicates in {values}")
        return Parameter(name, values=tuple(values))
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, Mapping) or not choices:
            raise SweepSpecError(f"{where}.choices: expected a mapping label -> cfg-options")
        for label, options in choices.items():
            if not isinstance(options, (Mapping, type(None))):
                raise SweepSpecError(f"{where}.choices.{label}: expected a mapping of cfg-options")
        return Parameter(name, choices={str(k): dict(v or {}) for k, v in choices.items()})
    if "max" not in raw or "min" not in raw:
        raise SweepSpecError(f"{where}: a range needs both min: and max:")
    low, high = _number(raw["min"], f"{where}.min"), _number(raw["max"], f"{where}.max")
    kind = raw.get("type", "int" if all(isinstance(x, int) for x in (low, high)) else "float")
    if kind not in ("int", "float"):
        raise SweepSpecError(f"{where}.type: expected int or float, got {kind!r}")
    if not low < high:
        raise SweepSpecError(f"{where}: min ({low}) must be below max ({high})")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise SweepSpecError(f"{where}: log: true needs min > 0, got {low}")
    return Parameter(name, low=low, high=high, log=log, kind=kind)


@dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep spec (see ``docs/sweeps.md`` for each field)."""

    name: str
    config: Path
    parameters: tuple[Parameter, ...]
    method: str = "grid"
    num_trials: int | None = None
    seed: int = 0
    metric: str = "rec/acc@0.5"
    goal: str = "maximize"
    report: tuple[str, ...] = ()
    parallel: int = 1
    base_options: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, str] | None = None
    data: dict[str, Any] | None = None
    validate: bool = False
    trial_timeout: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_trials(self) -> int:
        """Trials in the sweep: the grid's size (capped by ``num_trials``) or ``num_trials``."""
        if self.method != "grid":
            return self.num_trials
        size = math.prod(len(p.labels) for p in self.parameters)
        return size if self.num_trials is None else min(size, self.num_trials)


def _resolve_config(value: Any) -> Path:
    if not isinstance(value, str):
        raise SweepSpecError(f"config: expected a config path, got {value!r}")
    for path in (Path(value), REPO_ROOT / value):
        if path.is_file():
            return path.resolve()
    raise SweepSpecError(f"config: {value} not found (relative to . or {REPO_ROOT})")


def _int_field(raw: Mapping, key: str, default: int | None, minimum: int) -> int | None:
    value = raw.get(key, default)
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or value < minimum
    ):
        raise SweepSpecError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _section(raw: Mapping, key: str, allowed: tuple[str, ...]) -> dict | None:
    value = raw.get(key)
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise SweepSpecError(f"{key}: expected a mapping, got {value!r}")
    _check_fields(value, allowed, key)
    return dict(value)


def _metric(raw: Any) -> tuple[str, str, tuple[str, ...]]:
    """``metric:`` (a name, or name/goal/report) -> (name, goal, report)."""
    metric = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(metric, Mapping):
        raise SweepSpecError(f"metric: expected a name or a mapping, got {metric!r}")
    _check_fields(metric, METRIC_FIELDS, "metric")
    goal, report = metric.get("goal", "maximize"), metric.get("report", [])
    if goal not in ("maximize", "minimize"):
        raise SweepSpecError(f"metric.goal: maximize or minimize, got {goal!r}")
    if not isinstance(report, list) or not all(isinstance(r, str) for r in report):
        raise SweepSpecError(f"metric.report: expected a list of metric names, got {report!r}")
    return str(metric.get("name", "rec/acc@0.5")), goal, tuple(report)


def load_spec(source: str | Path | Mapping[str, Any]) -> SweepSpec:
    """Reads and validates a sweep spec (a YAML file or its mapping).

    Raises:
        SweepSpecError: Naming the field: unknown fields, a missing ``config``/``parameters``, an
            unknown ``method``, a range in a grid, ``num_trials`` missing for random/optuna, ...
    """
    raw = yaml.safe_load(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    if not isinstance(raw, Mapping):
        raise SweepSpecError(f"sweep spec: expected a mapping, got {type(raw).__name__}")
    _check_fields(raw, SPEC_FIELDS, "sweep spec")
    if "config" not in raw or not raw.get("parameters"):
        raise SweepSpecError("sweep spec: config: and parameters: are required")
    if not isinstance(raw["parameters"], Mapping):
        raise SweepSpecError("parameters: expected a mapping of cfg-option key -> search space")
    params = tuple(_parse_parameter(str(k), v) for k, v in raw["parameters"].items())
    method = raw.get("method", "grid")
    if method not in METHODS:
        raise SweepSpecError(f"method: unknown {method!r}; one of {sorted(METHODS)}")
    num_trials = _int_field(raw, "num_trials", None, 1)
    if method != "grid" and num_trials is None:
        raise SweepSpecError(f"num_trials: required for method {method!r}")
    ranges = [p.name for p in params if p.labels is None]
    if method == "grid" and ranges:
        raise SweepSpecError(
            f"parameters.{ranges[0]}: grid search needs values:/choices:, not "
            "a min:/max: range (use method: random or optuna)"
        )
    metric, goal, report = _metric(raw.get("metric", {}))
    wandb = _section(raw, "wandb", WANDB_FIELDS) if "wandb" in raw else {}
    if wandb is not None and wandb.get("mode", "offline") not in ("offline", "online", "disabled"):
        raise SweepSpecError(f"wandb.mode: offline, online or disabled, got {wandb['mode']!r}")
    base = raw.get("base_options") or {}
    if not isinstance(base, Mapping):
        raise SweepSpecError("base_options: expected a mapping of cfg-option key -> value")
    timeout = raw.get("trial_timeout")
    name = raw.get("name") or (Path(source).stem if isinstance(source, (str, Path)) else "sweep")
    return SweepSpec(
        name=str(name),
        config=_resolve_config(raw["config"]),
        parameters=params,
        method=method,
        num_trials=num_trials,
        seed=_int_field(raw, "seed", 0, 0),
        metric=metric,
        goal=goal,
        report=report,
        parallel=_int_field(raw, "parallel", 1, 1),
        base_options=dict(base),
        wandb=None if wandb is None or wandb.get("mode") == "disabled" else wandb,
        data=_section(raw, "data", DATA_FIELDS),
        validate=bool(raw.get("validate", False)),
        trial_timeout=None if timeout is None else float(_number(timeout, "trial_timeout")),
        raw=dict(raw),
    )


def wandb_sweep_config(
    spec: SweepSpec, spec_path: str | Path, sweep_dir: str | Path
) -> dict[str, Any]:
    """The equivalent W&B sweep config: ``wandb sweep`` it on a W&B server, then each
    ``wandb agent`` run calls ``tools/sweep.py SPEC --trial key=value ...`` for one trial.
    (optuna maps to W&B's ``bayes``; W&B logs the metric as ``test/<metric>``.)"""
    config = {
        "name": spec.name,
        "program": "tools/sweep.py",
        "method": METHODS[spec.method],
        "metric": {"name": f"test/{spec.metric}", "goal": spec.goal},
        "parameters": {p.name: p.wandb() for p in spec.parameters},
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            str(spec_path),
            "--work-dir",
            str(sweep_dir),
            "--trial",
            "${args_no_hyphens}",
        ],
    }
    if spec.wandb and spec.wandb.get("project"):
        config["project"] = spec.wandb["project"]
    if spec.method != "grid" or spec.num_trials is not None:
        config["run_cap"] = spec.total_trials
    return config


def parse_assignments(spec: SweepSpec, assignments: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (single-trial mode, ``wandb agent``) -> trial parameters.
    Parameters not given keep the config's value."""
    by_name, params = {p.name: p for p in spec.parameters}, {}
    for item in assignments:
        name, sep, text = item.lstrip("-").partition("=")
        if not sep or name not in by_name:
            raise SweepSpecError(
                f"--trial {item}: expected NAME=VALUE, NAME one of {list(by_name)}"
            )
        try:
            params[name] = by_name[name].parse(text)
        except ValueError as exc:
            raise SweepSpecError(f"--trial {item}: {exc}") from exc
    return params
