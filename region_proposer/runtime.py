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
from typing import Any

import torch
import torch.distributed as dist
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


def apply_cfg_options(cfg: Any, options: dict[str, Any] | None) -> None:
    """Merges ``--cfg-options`` into ``cfg``, refusing keys the config does not have.

    mmengine would silently add a misspelt key (``model.proposer.num_querys=50``) and train with
    the default; here the error names the key and the closest existing ones. A ``dict`` value
    replaces or extends a sub-dict only where its parent exists.
    """
    if not options:
        return
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
