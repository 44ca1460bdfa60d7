"""Shared fixtures of the GromaPX model and chat tests: a tiny synthetic dataset and tokenizer, the
tiny config pointed at them, and builders of models and batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope

from groma_px.data.synthetic import generate_dataset
from groma_px.engine.stages import chat_config
from groma_px.llm.tokenizer import build_tokenizer_from_jsonl
from groma_px.llm.vocab import GroundingVocab
from groma_px.models.perception_cache import _SHARED
from groma_px.registry import DATASETS, MODELS

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "groma-px_tiny.py"
NUM_REGION_TOKENS = 16


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 train / 4 val / 4 test synthetic images and a tokenizer with 16 region tokens."""
    root = tmp_path_factory.mktemp("groma_px_tiny")
    data_root = root / "data"
    generate_dataset(data_root, 8, 4, 4, seed=0)
    tokenizer_dir = root / "tokenizer"
    build_tokenizer_from_jsonl(
        [data_root / "train.jsonl"], tokenizer_dir, vocab=GroundingVocab(NUM_REGION_TOKENS)
    )
    return {"data_root": data_root, "tokenizer_dir": tokenizer_dir}


@pytest.fixture(scope="session")
def make_tiny_cfg(tiny_data: dict[str, Path]) -> Callable[[Path], Config]:
    """``make_tiny_cfg(work_dir)``: the tiny config with its data root and tokenizer set (unique
    experiment name, no checkpoint to load)."""

    def make(work_dir: Path) -> Config:
        return chat_config(
            TINY_CONFIG,
            data_root=tiny_data["data_root"],
            tokenizer_dir=tiny_data["tokenizer_dir"],
            work_dir=work_dir,
            load_from=None,
        )

    return make


@pytest.fixture
def tiny_cfg(make_tiny_cfg: Callable[[Path], Config], tmp_path: Path) -> Config:
    """The tiny config working in ``tmp_path / "work"``."""
    return make_tiny_cfg(tmp_path / "work")


@pytest.fixture
def build_model(tiny_cfg: Config) -> Callable[..., torch.nn.Module]:
    """``build_model(**model_overrides)``: the tiny GromaPX, seeded, in train mode."""

    def build(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        cfg = tiny_cfg.model.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        torch.manual_seed(seed)
        with DefaultScope.overwrite_default_scope("groma_px"):
            model = MODELS.build(cfg)
        return model.train()

    return build


@pytest.fixture
def make_batch(tiny_cfg: Config) -> Callable[..., dict]:
    """``make_batch(indices, split="train")``: a ``pseudo_collate`` batch of dataset items
    (``split="test"`` packs in predict mode)."""
    datasets: dict[str, Any] = {}

    def make(indices: Sequence[int], split: str = "train") -> dict:
        if split not in datasets:
            with DefaultScope.overwrite_default_scope("groma_px"):
                datasets[split] = DATASETS.build(tiny_cfg[f"{split}_dataloader"]["dataset"])
        return pseudo_collate([datasets[split][i] for i in indices])

    return make


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for the test: the tiny model's ops are far too small to split, and on
    a shared 2-core machine thread hand-offs made them ~100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_perception_store():
    """Each test starts without the process-wide perception store of earlier tests' models."""
    _SHARED.clear()
    yield
    _SHARED.clear()
