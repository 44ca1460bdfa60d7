"""``BaseProposer``: the contract every proposer implements (``FeaturePyramid -> Proposals``)."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

from mmengine.structures import InstanceData
from torch import Tensor, nn

from ..structures import FeaturePyramid, Proposals


class BaseProposer(nn.Module, metaclass=ABCMeta):
    """A class-agnostic region proposer.

    ``instances`` holds one ``InstanceData`` per image with, where available:

    - ``bboxes``: (M, 4) float ground-truth boxes, normalised xyxy of the unpadded image;
    - metainfo ``sample_id`` (str): key of the sample (used by ``CachedProposer``);
    - metainfo ``source`` (str): dataset name (selects the objectness head trained on it).

    Learned proposers ignore ``instances`` in :meth:`forward`; the oracle and cached proposers
    read them. Proposals come back unsorted and unfiltered (selection is the consumer's job).
    """

    #: False for proposers without parameters to train (oracle, cached).
    trainable: bool = True

    @abstractmethod
    def forward(
        self, feats: FeaturePyramid, instances: list[InstanceData] | None = None
    ) -> Proposals:
        """Proposes regions for a batch.

        Args:
            feats: Multi-scale features of the padded batch (``feats.valid_sizes`` gives each
                image's unpadded size).
            instances: Per-image annotations and meta, see the class docstring.

        Returns:
            ``Proposals`` with boxes normalised to each unpadded image.
        """

    def loss(
        self, feats: FeaturePyramid, instances: list[InstanceData]
    ) -> tuple[Proposals, dict[str, Tensor]]:
        """Proposals and training losses (name -> scalar tensor) for a batch with ground truth."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to train")
