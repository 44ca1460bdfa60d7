# Runtime defaults shared by every groma-px experiment (mmengine Runner fields).
default_scope = "groma_px"

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # Atomic: a run killed while saving keeps its previous checkpoint (groma_px.engine.checkpoint).
    checkpoint=dict(
        type="groma_px.AtomicCheckpointHook", interval=500, by_epoch=False, max_keep_ckpts=2
    ),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0))

# groma_px.engine registers the W&B backend and GroundingLoggerHook; the "groma_px." prefix finds
# them under default_scope="region_proposer" (stage-1 configs) as well. W&B runs offline unless
# the user is logged in or sets WANDB_MODE; GROMA_PX_WANDB=0 turns it off (docs/NOTES.md).
custom_imports = dict(imports=["groma_px.engine"], allow_failed_imports=False)
vis_backends = [dict(type="LocalVisBackend"), dict(type="groma_px.GromaWandbVisBackend")]
# No fixed name: mmengine then names it after the experiment, so several Runners in one process
# (the quickstart's stages) each log to their own work dir.
visualizer = dict(type="Visualizer", vis_backends=vis_backends)
# Throughput, test metrics, proposer diagnostics; score histogram and example table on W&B.
custom_hooks = [dict(type="groma_px.GroundingLoggerHook")]

# Iteration-based schedules everywhere (the tiny CPU pipeline and the paper-scale runs).
log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
log_level = "INFO"

load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
