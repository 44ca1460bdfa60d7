"""Stage-1 class-agnostic detection pre-training: model wrapper, box datasets, transforms."""

from .datasets import CocoBoxDataset
from .transforms import LoadImage, PackProposerInputs, RandomCrop, RandomFlip, Resize

__all__ = [
    "CocoBoxDataset",
    "LoadImage",
    "PackProposerInputs",
    "RandomCrop",
    "RandomFlip",
    "Resize",
]
