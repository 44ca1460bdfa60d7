"""The tiny pipeline run through ``tools/`` in subprocesses, on 1 or N processes (``torchrun``):
workspace, config file, launch and read-back, for the distributed tests and
``benchmarks/bench_train.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from region_proposer.runtime import apply_cfg_options

from ..data.synthetic import generate_dataset
from ..llm.tokenizer import build_tokenizer_from_jsonl
from ..llm.vocab import GroundingVocab
from ..registry import MODELS
from .stages import chat_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "groma-px_tiny.py"
#: One logged value per iteration (not a moving average), to compare loss curves.
PER_ITERATION_LOGS = {"log_processor.window_size": 1}
#: What draws random numbers per process in training, and so makes a rank's computation depend
#: on the number of processes (each rank's generators start from the same seed and then draw
#: for its own samples only): the mask loss's point sampling (torch), region shuffling
#: (torch), the region-text queries' dropped fields (torch) and the ``Random*`` data transforms
#: (numpy, e.g. ``RandomVisualPrompts``).
DETERMINISTIC = {
    "model.mask_head": None,
    "model.mask_loss": None,
    "model.selector.shuffle": False,
    "model.region_text_loss.drop_prob": 0.0,
}

#: Source of a hook module that kills training (SIGKILL) at the end of iteration
#: ``$SIGKILL_AT_ITER``, after that iteration's checkpoint: write it into a directory that the
#: config's ``custom_imports`` reaches (the kill-and-resume tests).
SIGKILL_HOOK_SOURCE = """import os
import signal

from mmengine.hooks import Hook

from groma_px.registry import HOOKS


@HOOKS.register_module()
class SigkillAtIterHook(Hook):
    # SIGKILL at the end of iteration $SIGKILL_AT_ITER, after that iteration's checkpoint.
    priority = "LOWEST"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if str(runner.iter + 1) == os.environ.get("SIGKILL_AT_ITER"):
            os.kill(os.getpid(), signal.SIGKILL)
"""


@dataclass(frozen=True)
class TinyWorkspace:
    """A synthetic data root and a tokenizer with its grounding tokens."""

    data_root: Path
    tokenizer_dir: Path


def make_workspace(
    root: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 2,
    num_test: int = 2,
    num_region_tokens: int = 16,
    seed: int = 0,
) -> TinyWorkspace:
    """Generates the synthetic splits (images, not records, are counted) and a tokenizer."""
    root = Path(root)
    data_root, tokenizer_dir = root / "data", root / "tokenizer"
    generate_dataset(data_root, num_train, num_val, num_test, seed=seed)
    build_tokenizer_from_jsonl(
        [data_root / "train.jsonl"], tokenizer_dir, vocab=GroundingVocab(num_region_tokens)
    )
    return TinyWorkspace(data_root, tokenizer_dir)


def write_config(
    path: str | Path,
    workspace: TinyWorkspace,
    *,
    base: str | Path = TINY_CONFIG,
    options: dict[str, Any] | None = None,
    additions: dict[str, Any] | None = None,
    deterministic: bool = True,
) -> Path:
    """Writes a self-contained config file: ``base`` pointed at ``workspace``, without a
    validation loop, every image padded to one size (``pad_to_size``: the longer side
    ``image_size`` rounded up to ``pad_size_divisor``, so that a sample's loss and prediction do
    not depend on its batch mates and 2 processes x batch b compute what 1 process x batch 2b
    does), with :data:`PER_ITERATION_LOGS` and ``additions`` (keys may be new;
    ``custom_hooks`` are appended to the base's) merged and ``options`` applied (keys must
    exist, as with ``--cfg-options``).

    Args:
        path: The config file to write; runs' work dirs default to its folder.
        workspace: Data root and tokenizer.
        base: The config to start from. Defaults to the tiny GromaPX.
        options: ``--cfg-options``-style overrides of existing keys.
        additions: Keys to merge, new ones allowed.
        deterministic: Remove what draws random numbers per process (:data:`DETERMINISTIC`,
            ``Random*`` training transforms), so that N processes compute what one does.
            Defaults to True.

    Returns:
        ``path``.
    """
    cfg = chat_config(
        base,
        data_root=workspace.data_root,
        tokenizer_dir=workspace.tokenizer_dir,
        work_dir=Path(path).parent / "work_dirs",
        load_from=None,
        validate=False,
    )
    cfg.pop("experiment_name")  # each run names itself after its start time
    additions = dict(additions or {})
    # custom hooks add to the base's (which a merge would replace)
    hooks = [*cfg.get("custom_hooks", []), *additions.pop("custom_hooks", [])]
    if deterministic:
        pipeline = cfg.train_dataloader.dataset.pipeline
        cfg.train_dataloader.dataset.pipeline = [
            step for step in pipeline if not step["type"].startswith("Random")
        ]
        additions = {**DETERMINISTIC, **additions}
    cfg.merge_from_dict({**_fixed_padding(cfg), **PER_ITERATION_LOGS, **additions})
    if hooks:
        cfg.custom_hooks = hooks
    apply_cfg_options(cfg, options)
    cfg.dump(str(path))
    return Path(path)


def _fixed_padding(cfg: Config) -> dict[str, Any]:
    """``pad_to_size`` for the largest resized image of ``cfg`` (its ``image_size``)."""
    divisor = cfg.model.data_preprocessor.get("pad_size_divisor", 1)
    side = -(-cfg.image_size // divisor) * divisor
    return {"model.data_preprocessor.pad_to_size": (side, side)}


def free_port() -> int:
    """A TCP port that is free now (for ``--master_port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool_command(tool: str, args: list[str], *, nproc: int = 1) -> list[str]:
    """``python tools/<tool>.py ARGS`` for 1 process, else the ``torchrun`` command with
    ``--launcher pytorch`` on a free port."""
    script = str(REPO_ROOT / "tools" / f"{tool}.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    launcher += [f"--master_port={free_port()}"]
    return [*launcher, script, *args, "--launcher", "pytorch"]


def tool_env(
    extra_pythonpath: list[str | Path] | None = None, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a tool run: repo (and ``extra_pythonpath``) importable, one thread
    per process, no hub access, W&B off unless ``GROMA_PX_WANDB`` is set; ``extra_env`` last."""
    paths = [str(REPO_ROOT), *map(str, extra_pythonpath or [])]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.update(TOKENIZERS_PARALLELISM="false")
    env.setdefault("GROMA_PX_WANDB", "0")  # no W&B run unless the caller asks for one
    env.update(extra_env or {})
    return env


def run_tool(
    tool: str,
    args: list[str],
    *,
    nproc: int = 1,
    extra_pythonpath: list[str | Path] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Runs ``tools/<tool>.py`` (:func:`tool_command`) from the repo root.

    Raises:
        RuntimeError: If ``check`` and the run failed; the message ends with its output.
    """
    proc = subprocess.run(
        tool_command(tool, args, nproc=nproc),
        cwd=REPO_ROOT,
        env=tool_env(extra_pythonpath, extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"tools/{tool}.py exited with {proc.returncode}:\n{tail}")
    return proc


def read_scalars(work_dir: str | Path) -> list[dict[str, Any]]:
    """Every row the ``LocalVisBackend`` wrote under ``work_dir``, runs in start order."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def train_losses(work_dir: str | Path) -> dict[int, float]:
    """``{iteration: loss}`` of the training rows of every run in ``work_dir`` (a resumed run's
    rows override the killed run's for the iterations it repeated)."""
    return {row["iter"]: row["loss"] for row in read_scalars(work_dir) if "loss" in row}


def save_initial_weights(config: str | Path, path: str | Path, *, seed: int = 0) -> Path:
    """Builds the model of ``config`` with ``seed`` and saves it as a checkpoint for
    ``load_from``, so runs under different runners (whose seeding and build order differ)
    start from the same weights."""
    cfg = Config.fromfile(str(config))
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("groma_px"):
        model = MODELS.build(cfg.model)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, str(path))
    return Path(path)


def load_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a training checkpoint this project wrote."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["state_dict"]
