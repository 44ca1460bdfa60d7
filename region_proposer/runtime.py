"""Runtime fixes for mmengine 0.10.7 on torch 2.14, applied by the tools before building a Runner.

1. torch now unpickles weights-only by default, and mmengine's own training checkpoints hold
   ``HistoryBuffer`` objects (mmengine issue 1655): the local checkpoint loader is re-registered
   with ``weights_only=False``. Use it only for checkpoints this project wrote; user-supplied
   weights load with safetensors or ``weights_only=True`` (see the backbone loaders).
2. ``launcher='pytorch'`` on a CPU-only machine fails in ``torch.cuda.set_device``: the gloo
   process group is created here first, and mmengine then skips its own initialisation.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.runner import CheckpointLoader

_PATCHED = False


def _load_local_training_checkpoint(filename: str, map_location: str | None = None) -> dict:
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"checkpoint not found: {filename}")
    return torch.load(filename, map_location=map_location, weights_only=False)


def patch_checkpoint_loader() -> None:
    """Lets mmengine resume/load this project's own training checkpoints on torch >= 2.6."""
    global _PATCHED
    if not _PATCHED:
        CheckpointLoader.register_scheme(prefixes="", force=True)(_load_local_training_checkpoint)
        _PATCHED = True


def init_cpu_distributed(launcher: str) -> None:
    """Creates the gloo process group for ``launcher='pytorch'`` when CUDA is unavailable."""
    if launcher == "pytorch" and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")


#: Where the variable a preset file defines goes in an experiment config.
PRESET_TARGETS = {"proposer": ("model", "proposer"), "backbone": ("model", "backbone")}


def _configs_root(cfg: Any) -> Path:
    """The ``configs/`` directory of a config file (the nearest ancestor holding ``_base_``)."""
    for parent in Path(cfg.filename).resolve().parents:
        if (parent / "_base_").is_dir():
            return parent
    raise FileNotFoundError(f"no configs root (a folder with _base_/) above {cfg.filename}")


def apply_preset(cfg: Any, name: str) -> None:
    """Replaces whole components with a preset file's, e.g. ``tiny/proposers/gt``.

    A preset defines one of :data:`PRESET_TARGETS` (``proposer = dict(...)``); the component at
    that place in ``cfg`` is replaced, not merged, so no keyword of the old type survives.
    """
    path = _configs_root(cfg) / f"{name.removesuffix('.py')}.py"
    if not path.is_file():
        raise FileNotFoundError(f"preset {name!r} not found: {path}")
    preset = Config.fromfile(str(path))
    found = [key for key in PRESET_TARGETS if key in preset]
    if not found:
        raise KeyError(f"preset {path} defines none of {sorted(PRESET_TARGETS)}")
    for key in found:
        parent, leaf = PRESET_TARGETS[key]
        if parent not in cfg or leaf not in cfg[parent]:
            raise KeyError(f"preset {name!r}: the config has no {parent}.{leaf} to replace")
        cfg[parent][leaf] = preset[key]
        if key in cfg:
            cfg[key] = preset[key]


def apply_cfg_options(cfg: Any, options: dict[str, Any] | None) -> None:
    """Merges ``--cfg-options`` into ``cfg``, refusing keys the config does not have.

    mmengine would silently add a misspelt key (``model.proposer.num_querys=50``) and train with
    the default; here the error names the key and the closest existing ones. The special key
    ``preset`` (one name or a list) applies preset files first (:func:`apply_preset`), so
    ``--cfg-options preset=tiny/proposers/gt`` swaps the proposer in one option.
    """
    if not options:
        return
    options = dict(options)
    presets = options.pop("preset", [])
    for name in [presets] if isinstance(presets, str) else presets:
        apply_preset(cfg, name)
    for key in options:
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            container = node
            if (
                isinstance(container, (list, tuple))
                and part.isdigit()
                and int(part) < len(container)
            ):
                node = container[int(part)]
                continue
            if not hasattr(container, "keys") or part not in container:
                where = ".".join(parts[:depth]) or "<config>"
                known = list(container.keys()) if hasattr(container, "keys") else []
                close = difflib.get_close_matches(part, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"--cfg-options {key}: {where} has no key {part!r}{hint}")
            node = container[part]
    cfg.merge_from_dict(options)
