"""Registry parent chain: one default scope finds groma_px, region_proposer and mmengine classes."""

import mmengine.runner  # noqa: F401  (registers mmengine's hooks, as any training script does)
import torch.nn as nn
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope

from groma_px.data import GroundedConversationDataset
from groma_px.registry import DATASETS, HOOKS, MODELS
from region_proposer.registry import MODELS as PROPOSER_MODELS


class _ChainProbeProposer(nn.Module):
    def __init__(self, num_queries: int = 3) -> None:
        super().__init__()
        self.num_queries = num_queries


def test_scopes_and_parents():
    assert MODELS.scope == "groma_px" and PROPOSER_MODELS.scope == "region_proposer"
    assert MODELS.parent is PROPOSER_MODELS and PROPOSER_MODELS.parent is MMENGINE_MODELS


def test_groma_scope_builds_proposer_registered_in_region_proposer():
    PROPOSER_MODELS.register_module(module=_ChainProbeProposer, force=True)
    try:
        with DefaultScope.overwrite_default_scope("groma_px"):
            built = MODELS.build(dict(type="_ChainProbeProposer", num_queries=5))
            # mmengine routes a build on the root registry to the default scope's registry.
            via_root = MMENGINE_MODELS.build(dict(type="_ChainProbeProposer"))
        assert isinstance(built, _ChainProbeProposer) and built.num_queries == 5
        assert isinstance(via_root, _ChainProbeProposer)
        assert MODELS.get("region_proposer._ChainProbeProposer") is _ChainProbeProposer
    finally:
        PROPOSER_MODELS._module_dict.pop("_ChainProbeProposer", None)


def test_groma_classes_and_mmengine_classes_resolve():
    with DefaultScope.overwrite_default_scope("groma_px"):
        assert DATASETS.get("GroundedConversationDataset") is GroundedConversationDataset
        assert HOOKS.get("CheckpointHook") is not None
        assert MODELS.get("NotAClass") is None
