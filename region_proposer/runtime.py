"""Runtime fixes for mmengine 0.10.7 on torch 2.14, applied by the tools before building a Runner.

1. torch now unpickles weights-only by default, and mmengine's own training checkpoints hold
   ``HistoryBuffer`` objects (mmengine issue 1655): the local checkpoint loader is re-registered
   with ``weights_only=False``. Use it only for checkpoints this project wrote; user-supplied
   weights load with safetensors or ``weights_only=True`` (see the backbone loaders).
2. ``launcher='pytorch'`` (or ``'slurm'``) on a CPU-only machine fails in
   ``torch.cuda.set_device``: the gloo process group is created here first, and mmengine then
   skips its own initialisation.
3. mmengine wraps DDP with ``device_ids=[LOCAL_RANK]``, which DDP refuses for CPU modules;
   :func:`configure_for_device` sets ``device_ids=None`` there (FSDP: ``device_id='cpu'``).
4. ``FSDPStrategy.load_optim_state_dict`` passes ``FSDP.optim_state_dict_to_load`` its arguments
   in the pre-2.1 order, so resuming an FSDP run fails, and on CPU its full optimizer state dict
   saves ``exp_avg_sq`` in place of ``exp_avg``: :class:`CompatFSDPStrategy` fixes both
   (config: ``strategy=dict(type="region_proposer.CompatFSDPStrategy", ...)``).
5. ``AmpOptimWrapper`` refuses CPU: :func:`optim_wrapper_for_device` turns a bf16 one into
   :class:`~region_proposer.optim.AutocastOptimWrapper` on CPUs with native bf16 (AVX-512 BF16,
   AMX) and into the fp32 ``OptimWrapper`` on other CPUs, so a config asks for bf16 once and
   still runs everywhere.

Configs stay device-free (STYLE.md): the device decisions are made here, at launch.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import STRATEGIES as MMENGINE_STRATEGIES
from mmengine.runner import CheckpointLoader, Runner
from torch.distributed.fsdp import FullOptimStateDictConfig
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from .optim import cpu_has_fast_bf16
from .registry import RUNNERS, STRATEGIES

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
    """Creates the gloo process group for ``launcher='pytorch'``/``'slurm'`` without CUDA.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; under
    ``srun`` they are derived from the Slurm variables as mmengine does (``MASTER_ADDR``: the
    first host of ``SLURM_NODELIST`` unless set; ``MASTER_PORT``: 29500 unless set).
    """
    if launcher not in ("pytorch", "slurm") or torch.cuda.is_available() or dist.is_initialized():
        return
    if launcher == "slurm":
        _slurm_env_to_torch()
    dist.init_process_group(backend="gloo")


@contextlib.contextmanager
def distributed_session(launcher: str) -> Iterator[None]:
    """Runs the body of a tool in its process group, and destroys the group on the way out.

    The group is created here on CPU (:func:`init_cpu_distributed`) or by mmengine's Runner on
    CUDA; either way a process that exits with it alive leaves its gloo/NCCL threads to the
    interpreter's teardown, where a rank can abort ("terminate called without an active
    exception", SIGABRT) after its work is done. After a clean body the ranks meet at a
    barrier first, so none tears its group down while a peer still talks to it; after an
    exception they do not wait for peers that may never arrive.
    """
    init_cpu_distributed(launcher)
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _slurm_env_to_torch() -> None:
    """Slurm's task variables -> the ``env://`` variables torch's rendezvous reads."""
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ["SLURM_NODELIST"]
        first = subprocess.getoutput(f"scontrol show hostname {nodes} | head -n1").strip()
        os.environ["MASTER_ADDR"] = first or "127.0.0.1"


#: ``AmpOptimWrapper`` arguments that ``OptimWrapper`` does not take.
_AMP_ONLY_KEYS = ("dtype", "loss_scale", "use_fsdp")


def optim_wrapper_for_device(
    optim_wrapper: dict, *, cuda: bool | None = None, cpu_bf16: bool | None = None
) -> dict:
    """The optim-wrapper config to use on this device (fix 5).

    ``AmpOptimWrapper`` (mixed precision, e.g. ``dtype="bfloat16"``) is kept on CUDA. Elsewhere
    a bf16 one becomes ``AutocastOptimWrapper`` (bf16 autocast, fp32 weights, no loss scaling)
    where the CPU has native bf16, and any other becomes the plain fp32 ``OptimWrapper``, with
    the AMP-only keys dropped. Every other wrapper, and ``accumulative_counts``, ``clip_grad``
    and ``paramwise_cfg``, pass unchanged.

    Args:
        optim_wrapper: The config's ``optim_wrapper`` dict.
        cuda: Whether CUDA is used. Defaults to None (``torch.cuda.is_available()``).
        cpu_bf16: Whether the CPU runs bf16 natively. Defaults to None
            (:func:`~region_proposer.optim.cpu_has_fast_bf16`).

    Returns:
        A new dict; ``optim_wrapper`` is not modified.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    out = copy.deepcopy(dict(optim_wrapper))
    if cuda or out.get("type") != "AmpOptimWrapper":
        return out
    bf16 = str(out.get("dtype")).replace("torch.", "") == "bfloat16"
    for key in _AMP_ONLY_KEYS:
        out.pop(key, None)
    if bf16 and (cpu_has_fast_bf16() if cpu_bf16 is None else cpu_bf16):
        out.update(type="region_proposer.AutocastOptimWrapper", dtype="bfloat16")
        return out
    warnings.warn(
        "AmpOptimWrapper needs CUDA (or, for bfloat16, a CPU with native bf16); training in "
        "fp32 with OptimWrapper",
        stacklevel=2,
    )
    out["type"] = "OptimWrapper"
    return out


def configure_for_device(cfg: Config, *, cuda: bool | None = None) -> None:
    """Fills in what depends on the device, in place, so configs need not name one.

    Without CUDA, distributed runs wrap DDP with ``device_ids=None`` (fix 3) and FSDP with
    ``device_id="cpu"``; the optim wrapper goes through :func:`optim_wrapper_for_device`.
    Values the config sets explicitly are kept.

    Args:
        cfg: The full config; ``cfg.launcher`` must be set already.
        cuda: Whether CUDA is used. Defaults to None (``torch.cuda.is_available()``).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cfg.get("optim_wrapper") is not None:
        cfg.optim_wrapper = optim_wrapper_for_device(cfg.optim_wrapper, cuda=cuda)
    if cuda or cfg.get("launcher", "none") == "none":
        return
    strategy = cfg.get("strategy")
    if strategy is None:  # the plain Runner: mmengine's own DDP wrapping
        wrapper = cfg.get("model_wrapper_cfg") or dict(
            type="MMDistributedDataParallel",
            broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False),
        )
        wrapper.setdefault("device_ids", None)
        cfg.model_wrapper_cfg = wrapper
        return
    wrapper = strategy.get("model_wrapper") or {}
    if "FSDP" in str(strategy.get("type", "")):
        wrapper.setdefault("device_id", "cpu")
    else:
        wrapper.setdefault("type", "MMDistributedDataParallel")
        wrapper.setdefault("broadcast_buffers", False)
        wrapper.setdefault("device_ids", None)
    strategy["model_wrapper"] = wrapper


def build_runner(cfg: Config) -> Runner:
    """``Runner.from_cfg``, or the runner class ``cfg.runner_type`` names (``FlexibleRunner``
    for the FSDP/DeepSpeed strategies), as mmdet's tools do."""
    if "runner_type" not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)


class StrictLoadHook(Hook):
    """Refuses a checkpoint that lacks weights of the model, naming the keys.

    mmengine's ``load_from`` loads non-strictly (right for initialising from another stage's
    weights) and only logs a mismatch, so an evaluation of a checkpoint trained with another
    config would report the metrics of randomly initialised weights. ``tools/test.py`` registers
    this hook: before the weights are loaded it compares the checkpoint's ``state_dict`` keys with
    the model's. Missing keys raise, naming the missing and unexpected ones; unexpected keys
    alone are only logged (evaluating a trained checkpoint with a weightless component, e.g. the
    ``cached`` proposer preset, leaves the old component's weights unused).
    """

    priority = "VERY_HIGH"

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Raises ``KeyError`` if model weights are missing (10 keys of each kind named)."""
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        strip = ("module.", "_fsdp_wrapped_module.")
        expected = {_strip(k, strip) for k in model.state_dict()}
        found = {_strip(k, strip) for k in checkpoint.get("state_dict", checkpoint)}
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        message = (
            "the checkpoint does not match the model config: "
            f"missing keys {_some(missing)}, unexpected keys {_some(unexpected)}"
        )
        if missing:
            raise KeyError(message)
        if unexpected:
            runner.logger.warning(f"{message}; the unexpected weights are not used")


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        key = key.replace(prefix, "")
    return key


def _some(keys: list[str], limit: int = 10) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})"
    return f"{keys[:limit]}{more}"


@STRATEGIES.register_module()
class CompatFSDPStrategy(MMENGINE_STRATEGIES.get("FSDPStrategy")):  # mmengine's is private
    """mmengine's ``FSDPStrategy`` whose resume works on torch 2.14, on GPU and on CPU (fix 4).

    Two fixes, both found by a CPU kill-and-resume test (tests/engine/test_fsdp.py):

    - mmengine 0.10.7 calls ``FSDP.optim_state_dict_to_load(state_dict, model, optimizer)``;
      since torch 2.1 the signature is ``(model, optim, optim_state_dict)``: keywords here.
    - With ``state_dict_cfg="full"`` mmengine gathers optimizer states with
      ``offload_to_cpu=True``. On a CPU process group, torch's gather reuses one buffer for all
      of a parameter's states and skips the clone (``.cpu()`` is a no-op there), so every saved
      ``exp_avg`` is a copy of ``exp_avg_sq``; without CUDA the offload is turned off (the
      states are cloned and on the CPU anyway).

    Use with ``state_dict_cfg="full"`` and ``model_wrapper=dict(use_orig_params=True)`` (frozen
    and trained parameters share FSDP's flat parameters).
    """

    def _init_state_dict_cfg(self, state_dict_cfg: str | dict) -> None:
        super()._init_state_dict_cfg(state_dict_cfg)
        config = self.optim_state_dict_config
        if isinstance(config, FullOptimStateDictConfig) and not torch.cuda.is_available():
            self.optim_state_dict_config = FullOptimStateDictConfig(
                rank0_only=config.rank0_only, offload_to_cpu=False
            )

    def load_optim_state_dict(self, state_dict: dict) -> None:
        """Loads a full optimizer state dict (as :meth:`FSDPStrategy.optim_state_dict` wrote)."""
        optim_state_dict = FSDP.optim_state_dict_to_load(
            model=self.model, optim=self.optim_wrapper.optimizer, optim_state_dict=state_dict
        )
        self.optim_wrapper.load_state_dict(optim_state_dict)


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
