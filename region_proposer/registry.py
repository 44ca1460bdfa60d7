"""mmengine registries of ``region_proposer`` (scope ``region_proposer``).

Every mmengine root registry gets a child here (as mmdet does), so a Runner under
``default_scope='region_proposer'`` finds mmengine's loops, hooks and optimisers without
fallback warnings. ``groma_px`` registries are children of these, so under
``default_scope='groma_px'`` a config can name a proposer too.
"""

from mmengine import registry as _mm
from mmengine.registry import Registry

SCOPE = "region_proposer"
PROPOSER_MODULES = [
    "region_proposer.proposers",
    "region_proposer.backbones",
    "region_proposer.pretrain",
    "region_proposer.heads",
    "region_proposer.matching",
    "region_proposer.losses",
]

MODELS = Registry("model", parent=_mm.MODELS, scope=SCOPE, locations=PROPOSER_MODULES)
DATASETS = Registry(
    "dataset", parent=_mm.DATASETS, scope=SCOPE, locations=["region_proposer.pretrain"]
)
TRANSFORMS = Registry(
    "transform", parent=_mm.TRANSFORMS, scope=SCOPE, locations=["region_proposer.pretrain"]
)
METRICS = Registry(
    "metric", parent=_mm.METRICS, scope=SCOPE, locations=["region_proposer.evaluation"]
)
# Children of mmengine's remaining registries (ours: CompatFSDPStrategy in runtime.py,
# AutocastOptimWrapper in optim.py).
DATA_SAMPLERS = Registry("data sampler", parent=_mm.DATA_SAMPLERS, scope=SCOPE)
EVALUATOR = Registry("evaluator", parent=_mm.EVALUATOR, scope=SCOPE)
FUNCTIONS = Registry("function", parent=_mm.FUNCTIONS, scope=SCOPE)
HOOKS = Registry("hook", parent=_mm.HOOKS, scope=SCOPE)
LOG_PROCESSORS = Registry("log_processor", parent=_mm.LOG_PROCESSORS, scope=SCOPE)
LOOPS = Registry("loop", parent=_mm.LOOPS, scope=SCOPE)
MODEL_WRAPPERS = Registry("model_wrapper", parent=_mm.MODEL_WRAPPERS, scope=SCOPE)
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    "optimizer wrapper constructor", parent=_mm.OPTIM_WRAPPER_CONSTRUCTORS, scope=SCOPE
)
OPTIM_WRAPPERS = Registry(
    "optim_wrapper", parent=_mm.OPTIM_WRAPPERS, scope=SCOPE, locations=["region_proposer.optim"]
)
OPTIMIZERS = Registry("optimizer", parent=_mm.OPTIMIZERS, scope=SCOPE)
PARAM_SCHEDULERS = Registry("parameter scheduler", parent=_mm.PARAM_SCHEDULERS, scope=SCOPE)
RUNNERS = Registry("runner", parent=_mm.RUNNERS, scope=SCOPE)
RUNNER_CONSTRUCTORS = Registry("runner constructor", parent=_mm.RUNNER_CONSTRUCTORS, scope=SCOPE)
STRATEGIES = Registry(
    "strategy", parent=_mm.STRATEGIES, scope=SCOPE, locations=["region_proposer.runtime"]
)
TASK_UTILS = Registry("task util", parent=_mm.TASK_UTILS, scope=SCOPE)
VISBACKENDS = Registry("vis_backend", parent=_mm.VISBACKENDS, scope=SCOPE)
VISUALIZERS = Registry("visualizer", parent=_mm.VISUALIZERS, scope=SCOPE)
WEIGHT_INITIALIZERS = Registry("weight initializer", parent=_mm.WEIGHT_INITIALIZERS, scope=SCOPE)
INFERENCERS = Registry("inferencer", parent=_mm.INFERENCERS, scope=SCOPE)
