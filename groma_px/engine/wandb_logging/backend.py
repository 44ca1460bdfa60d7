"""``GromaWandbVisBackend``: mmengine's W&B backend, offline unless logged in, a run per Runner."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mmengine.config import Config
from mmengine.visualization import WandbVisBackend

from ...registry import VISBACKENDS

DEFAULT_PROJECT = "groma-px"
SWITCH_ENV = "GROMA_PX_WANDB"  # "0" / "false" / "off": no W&B run at all (the test suite sets it)
_OFF = {"0", "false", "off", "no", "disabled"}
_DEFAULT_HOST = "https://api.wandb.ai"


def wandb_logged_in() -> bool:
    """Whether wandb would find credentials: ``WANDB_API_KEY`` (or
    ``WANDB_IDENTITY_TOKEN_FILE``), else an entry for the W&B host (``WANDB_BASE_URL``, default
    api.wandb.ai) with a password in the netrc file wandb reads (``$NETRC``, else ``~/.netrc``,
    else ``~/_netrc``). An unreadable netrc counts as not logged in."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    candidates = [Path(os.environ["NETRC"])] if os.environ.get("NETRC") else []
    candidates += [Path("~/.netrc"), Path("~/_netrc")]
    path = next((p.expanduser() for p in candidates if p.expanduser().is_file()), None)
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _DEFAULT_HOST).netloc
    if path is None or not host:
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(init_kwargs: dict[str, Any] | None = None) -> str:
    """The W&B mode a run would start in: ``"disabled"`` if ``GROMA_PX_WANDB`` is off, else
    ``init_kwargs["mode"]``, else ``WANDB_MODE``, else ``"online"`` when logged in
    (:func:`wandb_logged_in`) and ``"offline"`` otherwise.

    Args:
        init_kwargs: ``wandb.init`` keyword arguments. Defaults to None.
    """
    if os.environ.get(SWITCH_ENV, "").strip().lower() in _OFF:
        return "disabled"
    mode = (init_kwargs or {}).get("mode") or os.environ.get("WANDB_MODE")
    if mode:
        return str(mode)
    return "online" if wandb_logged_in() else "offline"


@VISBACKENDS.register_module()
class GromaWandbVisBackend(WandbVisBackend):
    """mmengine's ``WandbVisBackend`` with groma-px defaults.

    Differences from mmengine's backend:

    - Mode from :func:`resolve_wandb_mode`: offline unless logged in or chosen; ``disabled``
      (``GROMA_PX_WANDB=0`` or ``WANDB_MODE=disabled``) skips wandb entirely (no import, no run).
    - Each backend owns its ``wandb.Run`` (``reinit="create_new"``), so several Runners in one
      process each log to their own run; ``experiment`` returns that run, not the module.
    - ``close()`` (mmengine's ``LoggerHook.after_run``) finishes the run. Logging afterwards (a
      ``runner.test()`` after ``runner.train()``) starts a new run with the same init arguments
      and config: offline runs cannot be resumed (wandb 0.31 restarts ``_step`` at 0).
    - ``add_config`` keeps the keys of ``init_kwargs["config"]`` (overrides win) and logs code
      only if ``log_code=True`` (wandb scans the working directory for ``*.py`` files).

    Args:
        save_dir: mmengine's ``{work_dir}/{timestamp}/vis_data``; the default ``dir`` of the run.
        init_kwargs: ``wandb.init`` arguments (project, group, name, tags, config, mode, ...).
            ``project`` defaults to ``"groma-px"``. Defaults to None.
        define_metric_cfg: As in mmengine: ``{metric: summary}`` or a list of
            ``define_metric`` kwargs. Defaults to None.
        commit: Passed to ``run.log``. Defaults to True.
        log_code: Save the working directory's code with the run. Defaults to False.
        log_code_name: Name of the code artifact. Defaults to None.
        watch_kwargs: ``run.watch`` arguments for ``add_graph``. Defaults to None.
    """

    def __init__(
        self,
        save_dir: str,
        init_kwargs: dict[str, Any] | None = None,
        define_metric_cfg: dict | list | None = None,
        commit: bool = True,
        log_code: bool = False,
        log_code_name: str | None = None,
        watch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        init_kwargs = dict(init_kwargs or {})
        init_kwargs.setdefault("project", DEFAULT_PROJECT)
        super().__init__(
            save_dir,
            init_kwargs=init_kwargs,
            define_metric_cfg=define_metric_cfg,
            commit=commit,
            log_code_name=log_code_name,
            watch_kwargs=watch_kwargs,
        )
        self._log_code = log_code
        self._run: Any = None
        self._config: dict[str, Any] | None = None  # replayed into a run started after close()

    @property
    def mode(self) -> str:
        """The resolved W&B mode (see :func:`resolve_wandb_mode`)."""
        return resolve_wandb_mode(self._init_kwargs)

    @property
    def enabled(self) -> bool:
        """False when W&B is disabled: every method is then a no-op."""
        return self.mode != "disabled"

    def _init_env(self) -> None:
        """Starts this backend's run (nothing when disabled)."""
        if not self.enabled:
            return
        import wandb  # deferred: wandb is slow to import and optional when disabled

        kwargs = dict(self._init_kwargs or {}, mode=self.mode)
        kwargs.setdefault("dir", self._save_dir)
        kwargs.setdefault("reinit", "create_new")
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(**kwargs)
        cfg = self._define_metric_cfg
        for metric_cfg in (
            [{"name": k, "summary": v} for k, v in cfg.items()] if isinstance(cfg, dict) else cfg
        ) or []:
            self._run.define_metric(**metric_cfg)
        if self._config is not None:
            self._update_config(self._config)

    def _ready(self) -> bool:
        """Starts the run if needed; whether there is one to log to."""
        if not self._env_initialized:
            self._init_env()
            self._env_initialized = True
        return self._run is not None

    @property
    def experiment(self) -> Any:
        """This backend's ``wandb.Run`` (None when disabled), started on first access."""
        return self._run if self._ready() else None

    def add_config(self, config: Config, **kwargs: Any) -> None:
        """Records the Runner's config (keys in ``init_kwargs["config"]`` keep their value)."""
        self._config = config.to_dict()
        if self._ready():
            self._update_config(self._config)
            if self._log_code:
                self._run.log_code(name=self._log_code_name)

    def _update_config(self, config: dict[str, Any]) -> None:
        overrides = (self._init_kwargs or {}).get("config") or {}
        update = {k: v for k, v in config.items() if k not in overrides}
        self._run.config.update(update, allow_val_change=True)

    def add_graph(self, model: Any, data_batch: Any, **kwargs: Any) -> None:
        """Watches the model's gradients and parameters (``run.watch``)."""
        if self._ready():
            self._run.watch(model, **self._watch_kwargs)

    def add_image(self, name: str, image: Any, step: int = 0, **kwargs: Any) -> None:
        """Logs an RGB image; ``step`` is ignored as in mmengine (W&B counts its own steps)."""
        if self._ready():
            import wandb

            self._run.log({name: wandb.Image(image)}, commit=self._commit)

    def add_scalar(self, name: str, value: Any, step: int = 0, **kwargs: Any) -> None:
        """Logs one scalar; ``step`` is ignored as in mmengine."""
        if self._ready():
            self._run.log({name: value}, commit=self._commit)

    def add_scalars(
        self, scalar_dict: dict, step: int = 0, file_path: str | None = None, **kwargs: Any
    ) -> None:
        """Logs a dict of scalars as one W&B step; ``step`` and ``file_path`` are ignored."""
        if self._ready():
            self._run.log(dict(scalar_dict), commit=self._commit)

    def close(self) -> None:
        """Finishes the run; a later log call starts a new one."""
        if self._run is not None:
            self._run.finish()
        self._run = None
        self._env_initialized = False
