"""Stage-1 class-agnostic detection pre-training: model wrapper, auxiliary region classifier,
box refiner, box datasets, transforms."""

from .box_refiner import BoxRefiner
from .data_preprocessor import ProposerDataPreprocessor
from .datasets import CocoBoxDataset
from .model import ProposerPretrainer, with_in_channels
from .region_classifier import RegionClassifier
from .transforms import LoadImage, PackProposerInputs, RandomCrop, RandomFlip, Resize

__all__ = [
    "BoxRefiner",
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
