"""mmengine registries of ``groma_px`` (scope ``groma_px``).

Each registry's parent is ``region_proposer``'s registry of the same kind, whose parent is
mmengine's, mirroring the import direction: under ``default_scope='groma_px'`` a build finds
``groma_px`` classes first, then proposers, then mmengine's own. Parent lookups skip the parent's
``locations``, so the proposer modules are listed here as well.
"""

from mmengine.registry import Registry

from region_proposer import registry as _rp

SCOPE = "groma_px"

MODELS = Registry(
    "model",
    parent=_rp.MODELS,
    scope=SCOPE,
    locations=[
        "groma_px.models",
        "groma_px.region_encoder",
        "groma_px.mask_head",
        "groma_px.vision",
        "groma_px.llm.adapter",
        *_rp.PROPOSER_MODULES,
    ],
)
DATASETS = Registry(
    "dataset",
    parent=_rp.DATASETS,
    scope=SCOPE,
    locations=["groma_px.data", "region_proposer.pretrain"],
)
TRANSFORMS = Registry(
    "transform",
    parent=_rp.TRANSFORMS,
    scope=SCOPE,
    locations=["groma_px.data", "groma_px.data.chat_transforms", "region_proposer.pretrain"],
)
METRICS = Registry(
    "metric",
    parent=_rp.METRICS,
    scope=SCOPE,
    locations=["groma_px.evaluation", "region_proposer.evaluation"],
)
HOOKS = Registry("hook", parent=_rp.HOOKS, scope=SCOPE, locations=["groma_px.engine"])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    "optimizer wrapper constructor",
    parent=_rp.OPTIM_WRAPPER_CONSTRUCTORS,
    scope=SCOPE,
    locations=["groma_px.engine"],
)
DATA_SAMPLERS = Registry(
    "data sampler", parent=_rp.DATA_SAMPLERS, scope=SCOPE, locations=["groma_px.data.samplers"]
)
EVALUATOR = Registry("evaluator", parent=_rp.EVALUATOR, scope=SCOPE)
FUNCTIONS = Registry("function", parent=_rp.FUNCTIONS, scope=SCOPE)
LOG_PROCESSORS = Registry("log_processor", parent=_rp.LOG_PROCESSORS, scope=SCOPE)
LOOPS = Registry("loop", parent=_rp.LOOPS, scope=SCOPE)
MODEL_WRAPPERS = Registry("model_wrapper", parent=_rp.MODEL_WRAPPERS, scope=SCOPE)
OPTIM_WRAPPERS = Registry("optim_wrapper", parent=_rp.OPTIM_WRAPPERS, scope=SCOPE)
OPTIMIZERS = Registry("optimizer", parent=_rp.OPTIMIZERS, scope=SCOPE)
PARAM_SCHEDULERS = Registry("parameter scheduler", parent=_rp.PARAM_SCHEDULERS, scope=SCOPE)
RUNNERS = Registry("runner", parent=_rp.RUNNERS, scope=SCOPE)
RUNNER_CONSTRUCTORS = Registry("runner constructor", parent=_rp.RUNNER_CONSTRUCTORS, scope=SCOPE)
STRATEGIES = Registry("strategy", parent=_rp.STRATEGIES, scope=SCOPE)
TASK_UTILS = Registry("task util", parent=_rp.TASK_UTILS, scope=SCOPE)
VISBACKENDS = Registry("vis_backend", parent=_rp.VISBACKENDS, scope=SCOPE)
VISUALIZERS = Registry("visualizer", parent=_rp.VISUALIZERS, scope=SCOPE)
WEIGHT_INITIALIZERS = Registry("weight initializer", parent=_rp.WEIGHT_INITIALIZERS, scope=SCOPE)
INFERENCERS = Registry("inferencer", parent=_rp.INFERENCERS, scope=SCOPE)
