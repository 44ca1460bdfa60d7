"""mmengine registries of ``region_proposer`` (scope ``region_proposer``).

``groma_px`` registries are children of these, so under ``default_scope='groma_px'`` a config can
name a proposer, and under ``default_scope='region_proposer'`` the proposer trains on its own.
"""

from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry

MODELS = Registry(
    "model",
    parent=MMENGINE_MODELS,
    scope="region_proposer",
    locations=[
        "region_proposer.proposers",
        "region_proposer.backbones",
        "region_proposer.pretrain",
        "region_proposer.heads",
        "region_proposer.matching",
        "region_proposer.losses",
    ],
)
DATASETS = Registry(
    "dataset",
    parent=MMENGINE_DATASETS,
    scope="region_proposer",
    locations=["region_proposer.pretrain"],
)
TRANSFORMS = Registry(
    "transform",
    parent=MMENGINE_TRANSFORMS,
    scope="region_proposer",
    locations=["region_proposer.pretrain"],
)
METRICS = Registry(
    "metric",
    parent=MMENGINE_METRICS,
    scope="region_proposer",
    locations=["region_proposer.evaluation"],
)
