"""Export a trained ``GromaPX`` to a self-contained directory, and load it back.

Layout of an exported directory::

    config.py           the model and test-pipeline config (mmengine), paths made relative
    model.safetensors   every model weight (loaded with safetensors: no pickle)
    tokenizer/          the tokenizer holding the grounding tokens
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from safetensors.torch import load_file, save_file
from torch import nn

from ..registry import MODELS

CONFIG_FILE = "config.py"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
#: Placeholder for the export directory inside an exported config.
EXPORT_DIR_TOKEN = "{export_dir}"


def export_pretrained(model: nn.Module, cfg: Config, directory: str | Path) -> Path:
    """Writes ``model`` (a built ``GromaPX``) and its config to ``directory``, atomically.

    The directory is assembled next to its destination and renamed into place, so an
    interrupted export never leaves a half-written model behind.

    Args:
        model: The trained model (``runner.model``, unwrapped).
        cfg: The config the model was built from (``model`` and ``test_pipeline`` are kept).
        directory: Destination; replaced if it exists.

    Returns:
        The destination path.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        # clone: tied tables share memory, which safetensors refuses to write twice
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        _export_config(cfg, model).dump(str(staging / CONFIG_FILE))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _export_config(cfg: Config, model: nn.Module) -> Config:
    """The parts of ``cfg`` an exported model needs, with the tokenizer path made relative."""
    model_cfg = _to_plain(cfg.model)
    model_cfg["tokenizer"] = EXPORT_DIR_TOKEN + "/" + TOKENIZER_DIR
    llm = model_cfg.get("llm", {})
    if llm.pop("pretrained", None):
        # The weights travel in model.safetensors; keep the architecture only.
        llm["config"] = model.llm.architecture()
    pipeline = _to_plain(cfg.get("test_pipeline", []))
    for step in pipeline:
        if step.get("type") == "PackGroundedChatInputs":
            step["tokenizer"] = EXPORT_DIR_TOKEN + "/" + TOKENIZER_DIR
            step["mode"] = "predict"
    return Config(dict(model=model_cfg, test_pipeline=pipeline, default_scope="groma_px"))


def _to_plain(value: Any) -> Any:
    """ConfigDict/tuple trees -> plain dicts/lists (so the config dumps without references)."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _resolve(value: Any, directory: Path) -> Any:
    if isinstance(value, str) and value.startswith(EXPORT_DIR_TOKEN):
        return str(directory) + value[len(EXPORT_DIR_TOKEN) :]
    if isinstance(value, dict):
        return {k: _resolve(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, directory) for v in value]
    return value


def load_exported(directory: str | Path) -> tuple[nn.Module, list[dict]]:
    """Builds the model of an exported directory and loads its weights strictly.

    Returns:
        ``(model in eval mode, test pipeline config)``.

    Raises:
        FileNotFoundError: If a file of the layout is missing (named).
        KeyError: If the weights do not match the config (missing and unexpected keys named).
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} is missing; is {directory} an export?")
    cfg = Config.fromfile(str(directory / CONFIG_FILE))
    model_cfg = _resolve(_to_plain(cfg.model), directory)
    model_cfg.pop("init_cfg", None)
    with DefaultScope.overwrite_default_scope("groma_px"):
        model = MODELS.build(model_cfg)
    state = load_file(str(directory / WEIGHTS_FILE))
    load_state_dict_strict(model, state, source=str(directory / WEIGHTS_FILE))
    model.eval()
    return model, _resolve(_to_plain(cfg.get("test_pipeline", [])), directory)


def load_state_dict_strict(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str
) -> None:
    """``load_state_dict(strict=True)`` whose error names the missing and unexpected keys."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(
            f"{source} does not match the model config: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )
    model.load_state_dict(state, strict=True)
