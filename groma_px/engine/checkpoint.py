"""Crash-safe checkpointing: ``AtomicCheckpointHook`` and the atomic file writes it relies on.

mmengine 0.10.7's ``CheckpointHook`` deletes the oldest checkpoint *before* saving the new one and
writes both the checkpoint and the ``last_checkpoint`` pointer in place; a run killed while
saving (with ``max_keep_ckpts=1``) is left with a truncated checkpoint, no older one, and a
pointer to either. Here every file is written to a temporary name in the same directory,
flushed to disk and renamed over its destination (``os.replace``, atomic on POSIX), in this order:
new checkpoint, pointer, then the removal of checkpoints beyond ``max_keep_ckpts``. At any instant
of a kill the pointer names a complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS

#: Suffix of a checkpoint being written (``.iter_8.pth.partial``); never a valid checkpoint.
PARTIAL_SUFFIX = ".partial"
#: The pointer file mmengine's ``find_latest_checkpoint`` reads in the work dir.
POINTER_FILE = "last_checkpoint"


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


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose periodic checkpoints survive a kill at any moment.

    Same arguments as mmengine's ``CheckpointHook``. A checkpoint is saved under a
    temporary name (``.iter_8.pth.partial``) by the runner's own ``save_checkpoint`` (so DDP,
    FSDP and the message hub behave as usual), fsynced and renamed; then ``last_checkpoint`` is
    replaced atomically; only then are checkpoints beyond ``max_keep_ckpts`` removed. Remote
    backends (``backend_args``) fall back to mmengine's behaviour; ``save_best`` checkpoints
    are written by mmengine as before (not atomically).
    """

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        if not isinstance(self.file_backend, LocalBackend):
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        evicted = self._track(runner, step)
        filename = self.filename_tmpl.format(step)
        out_dir = Path(self.out_dir)
        self.last_ckpt = str(out_dir / filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        staged = out_dir / f".{filename}{PARTIAL_SUFFIX}"
        try:
            runner.save_checkpoint(
                str(out_dir),
                staged.name,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args,
            )
        except BaseException:
            if is_main_process():
                _remove(staged)
            raise
        # Sharded-state strategies gather on every rank; only the main process writes files.
        if not is_main_process():
            return
        publish(staged, out_dir / filename)
        atomic_write_text(Path(runner.work_dir) / POINTER_FILE, self.last_ckpt)
        for old in evicted:
            _remove(out_dir / self.filename_tmpl.format(old))

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
