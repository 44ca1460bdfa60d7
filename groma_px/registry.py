"""mmengine registries of ``groma_px`` (scope ``groma_px``).

Each registry's parent is ``region_proposer``'s registry of the same kind where one exists (else
mmengine's), mirroring the import direction: under ``default_scope='groma_px'`` a build finds
``groma_px`` classes first, then proposers, then mmengine's own. Parent lookups skip the parent's
``locations``, so the proposer modules are listed here as well.
"""

from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry

from region_proposer.registry import DATASETS as PROPOSER_DATASETS
from region_proposer.registry import METRICS as PROPOSER_METRICS
from region_proposer.registry import MODELS as PROPOSER_MODELS
from region_proposer.registry import TRANSFORMS as PROPOSER_TRANSFORMS

SCOPE = "groma_px"

MODELS = Registry(
    "model",
    parent=PROPOSER_MODELS,
    scope=SCOPE,
    locations=[
        "groma_px.models",
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
    parent=PROPOSER_DATASETS,
    scope=SCOPE,
    locations=["groma_px.data", "region_proposer.pretrain"],
)
TRANSFORMS = Registry(
    "transform",
    parent=PROPOSER_TRANSFORMS,
    scope=SCOPE,
    locations=["groma_px.data", "region_proposer.pretrain"],
)
METRICS = Registry(
    "metric",
    parent=PROPOSER_METRICS,
    scope=SCOPE,
    locations=["groma_px.evaluation", "region_proposer.evaluation"],
)
EVALUATOR = Registry("evaluator", parent=MMENGINE_EVALUATOR, scope=SCOPE)
HOOKS = Registry("hook", parent=MMENGINE_HOOKS, scope=SCOPE, locations=["groma_px.engine"])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    "optimizer wrapper constructor",
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
    scope=SCOPE,
    locations=["groma_px.engine"],
)
VISUALIZERS = Registry("visualizer", parent=MMENGINE_VISUALIZERS, scope=SCOPE)
VISBACKENDS = Registry("vis_backend", parent=MMENGINE_VISBACKENDS, scope=SCOPE)
