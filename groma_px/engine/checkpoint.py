"""Crash-safe checkpointing: ``AtomicCheckpointHook`` and the atomic file writes it relies on.

mmengine 0.10.7's ``CheckpointHook`` deletes the oldest checkpoint *before* saving the new one and
writes both the checkpoint and the ``last_checkpoint`` pointer in place; a run killed while
saving (with ``max_keep_ckpts=1``) is left with a truncated checkpoint, no older one, and a
pointer to either. Here every file is written to a temporary name in the same directory,
flushed to disk and renamed over its destination (``os.replace``, atomic on POSIX), in this order:
new checkpoint, pointer, then the removal of checkpoints beyond ``max_keep_ckpts``. At any instant
of a kill the pointer names a complete checkpoint. ``save_best`` checkpoints are written the same
way, and the previous best is removed only after the new one is in place.

mmengine also checkpoints no random-number state: a resumed run re-seeds and then draws other
visual prompts, mask-loss subsets and region orders than the uninterrupted run would have. The
hook stores the Python, NumPy, torch (and CUDA) generator states of a one-process run in each
checkpoint and restores them on resume at the exact point the uninterrupted run had reached:
after the train loop has skipped the batches already trained, before it fetches the next one.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS

#: Suffix of a checkpoint being written (``.iter_8.pth.partial``); never a valid checkpoint.
PARTIAL_SUFFIX = ".partial"
#: The pointer file mmengine's ``find_latest_checkpoint`` reads in the work dir.
POINTER_FILE = "last_checkpoint"
#: Checkpoint key of the per-rank random-number states.
RNG_KEY = "rng_state"


def _fsync_path(path: Path) -> None:
    """Flushes a file, or a directory entry list, to disk (no-op where the OS refuses)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync directories
        pass
    finally:
        os.close(fd)


def publish(staged: str | Path, final: str | Path) -> None:
    """Moves a completely written file (or directory) into place atomically.

    Args:
        staged: The written file, in the same directory as ``final`` (same filesystem).
        final: Destination; an existing file is replaced, an existing directory removed first.
    """
    staged, final = Path(staged), Path(final)
    if staged.is_file():
        _fsync_path(staged)
    elif final.is_dir():  # directory checkpoints (DeepSpeed) cannot be renamed over
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_path(final.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old or the new content, never a part."""
    path = Path(path)
    staged = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with open(staged, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish(staged, path)


def _remove(path: Path) -> None:
    if path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and (where present) CUDA generator states, as
    tensors and plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Sets the generators to a :func:`capture_rng_state` result."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _RestoreRngAfter(Iterator):
    """Wraps the train loop's dataloader iterator: after ``skip`` batches (the ones the loop
    skips on resume) it restores ``state``, then hands the loop its iterator back."""

    def __init__(self, loop: Any, skip: int, state: dict[str, Any]) -> None:
        self.loop, self.inner, self.skip, self.state = loop, loop.dataloader_iterator, skip, state

    def __next__(self) -> Any:
        if self.skip == 0:
            restore_rng_state(self.state)
            self.loop.dataloader_iterator = self.inner
        self.skip -= 1
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:  # the loop also reads e.g. ``.epoch``
        return getattr(self.inner, name)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose periodic checkpoints survive a kill at any moment.

    Same arguments as mmengine's ``CheckpointHook``. A checkpoint is saved under a
    temporary name (``.iter_8.pth.partial``) by the runner's own ``save_checkpoint`` (so DDP,
    FSDP and the message hub behave as usual), fsynced and renamed; then ``last_checkpoint`` is
    replaced atomically; only then are checkpoints beyond ``max_keep_ckpts`` removed.
    ``save_best`` checkpoints are staged and renamed too, the previous best removed after.
    Remote backends (``backend_args``) fall back to mmengine's behaviour.

    A one-process run's checkpoints also carry its random-number states (:data:`RNG_KEY`); on resume
    (not on ``load_from``) they are restored where the uninterrupted run stood, so that a run
    with random visual prompts, mask-loss subsets or shuffled regions continues bit for bit.
    A resume on another number of processes keeps the fresh seeds, with a warning. Validation
    leaves the generators as it found them, so that how often it runs does not change training.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resumed_rng: tuple[int, list[dict[str, Any]]] | None = None
        self._train_rng: dict[str, Any] | None = None

    # ---- random-number state -----------------------------------------------------------------
    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        # mmengine saves on the main process only (no collective is safe here): its states alone.
        checkpoint[RNG_KEY] = [capture_rng_state()] if get_world_size() == 1 else []

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        states, meta = checkpoint.get(RNG_KEY), checkpoint.get("meta", {})
        self._resumed_rng = None if states is None else (meta.get("iter", -1), states)

    def before_train(self, runner: Any) -> None:
        super().before_train(runner)
        if self._resumed_rng is None:
            return
        step, states = self._resumed_rng
        self._resumed_rng = None
        loop = runner.train_loop
        if step != runner.iter or not hasattr(loop, "dataloader_iterator"):
            return  # load_from (a fine-tuning start), or an epoch-based loop: fresh seeds
        if len(states) != get_world_size():
            runner.logger.warning(
                f"the checkpoint holds random-number states of {len(states)} processes, this "
                f"run has {get_world_size()}: not restored (the run continues, not bit for bit)"
            )
            return
        loop.dataloader_iterator = _RestoreRngAfter(loop, runner.iter, states[get_rank()])

    def before_val(self, runner: Any) -> None:
        # Validation draws random numbers too (a dataloader iterator takes a seed from torch's
        # generator): without this, when it ran would change the training after it, and a
        # resume (which does not re-run it) would not continue the same random stream.
        self._train_rng = capture_rng_state()

    def after_val(self, runner: Any) -> None:
        state, self._train_rng = self._train_rng, None
        if state is not None:
            restore_rng_state(state)

    # ---- atomic writes -----------------------------------------------------------------------
    def _save_staged(self, runner: Any, filename: str, **kwargs: Any) -> None:
        """``runner.save_checkpoint`` to a temporary name, then renamed to ``filename``."""
        out_dir = Path(self.out_dir)
        staged = out_dir / f".{filename}{PARTIAL_SUFFIX}"
        try:
            runner.save_checkpoint(
                str(out_dir),
                staged.name,
                self.file_client_args,
                backend_args=self.backend_args,
                **kwargs,
            )
        except BaseException:
            if is_main_process():
                _remove(staged)
            raise
        # Sharded-state strategies gather on every rank; only the main process writes files.
        if is_main_process():
            publish(staged, out_dir / filename)

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        if not isinstance(self.file_backend, LocalBackend):
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        evicted = self._track(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = str(Path(self.out_dir) / filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        self._save_staged(
            runner,
            filename,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            **self.args,
        )
        if not is_main_process():
            return
        atomic_write_text(Path(runner.work_dir) / POINTER_FILE, self.last_ckpt)
        for old in evicted:
            _remove(Path(self.out_dir) / self.filename_tmpl.format(old))

    def _save_best_checkpoint(self, runner: Any, metrics: dict) -> None:
        """mmengine's rule (one best checkpoint per key indicator, named
        ``best_{key}_{iter_N}.pth``, the runtime info ``best_score``/``best_ckpt``, or suffixed
        with the key when there are several), with the new best written before the old goes."""
        if not self.save_best or not isinstance(self.file_backend, LocalBackend):
            super()._save_best_checkpoint(runner, metrics)
            return
        step = runner.epoch if self.by_epoch else runner.iter
        ckpt_filename = self.filename_tmpl.format(step)
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        if "auto" in self.key_indicators:
            self._init_rule(self.rules, [next(iter(metrics))])
        single = len(self.key_indicators) == 1
        updated = False
        for key, rule in zip(self.key_indicators, self.rules, strict=True):
            score_key, path_key = (
                ("best_score", "best_ckpt")
                if single
                else (
                    f"best_score_{key}",
                    f"best_ckpt_{key}",
                )
            )
            best = runner.message_hub.runtime_info.get(score_key, self.init_value_map[rule])
            score = metrics[key]
            if score is None or not self.is_better_than[key](score, best):
                continue
            updated = True
            runner.message_hub.update_info(score_key, score)
            previous = self.best_ckpt_path if single else self.best_ckpt_path_dict.get(key)
            name = f"best_{key}_{ckpt_filename}".replace("/", "_")
            path = str(Path(self.out_dir) / name)
            if single:
                self.best_ckpt_path = path
            else:
                self.best_ckpt_path_dict[key] = path
            runner.message_hub.update_info(path_key, path)
            self._save_staged(
                runner,
                name,
                save_optimizer=False,
                save_param_scheduler=False,
                meta=meta,
                by_epoch=False,
            )
            if previous and Path(previous) != Path(path) and is_main_process():
                _remove(Path(previous))
                runner.logger.info(f"The previous best checkpoint {previous} is removed")
            runner.logger.info(
                f"The best checkpoint with {score:0.4f} {key} at {step} "
                f"{'epoch' if self.by_epoch else 'iter'} is saved to {name}."
            )
        # as mmengine: re-save the periodic checkpoint so that it records the new best
        if updated and self.last_ckpt is not None:
            self._save_checkpoint_with_step(runner, step, meta)

    def _track(self, runner: Any, step: int) -> list[int]:
        """Records ``step`` among the kept checkpoints; returns the steps to remove after the
        save (mmengine removes them before it)."""
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return []
        evicted = []
        while len(self.keep_ckpt_ids) >= self.max_keep_ckpts:
            evicted.append(self.keep_ckpt_ids.popleft())
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
        return evicted
