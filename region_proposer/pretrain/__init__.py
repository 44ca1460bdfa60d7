"""Stage-1 class-agnostic detection pre-training: model wrapper, auxiliary region classifier, box
datasets, transforms."""

from .data_preprocessor import ProposerDataPreprocessor
from .datasets import CocoBoxDataset
from .model import ProposerPretrainer, with_in_channels
from .region_classifier import RegionClassifier
from .transforms import LoadImage, PackProposerInputs, RandomCrop, RandomFlip, Resize

__all__ = [
    "CocoBoxDataset",
    "LoadImage",
    "PackProposerInputs",
    "ProposerDataPreprocessor",
    "ProposerPretrainer",
    "RandomCrop",
    "RandomFlip",
    "RegionClassifier",
    "Resize",
    "with_in_channels",
]
