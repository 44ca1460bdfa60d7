# Runtime defaults shared by every groma-px experiment (mmengine Runner fields).
default_scope = "groma_px"

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=10),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=500, by_epoch=False, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
)

env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0))

vis_backends = [dict(type="LocalVisBackend")]
# No fixed name: mmengine then names it after the experiment, so several Runners in one process
# (the quickstart's stages) each log to their own work dir.
visualizer = dict(type="Visualizer", vis_backends=vis_backends)

# Iteration-based schedules everywhere (the tiny CPU pipeline and the paper-scale runs).
log_processor = dict(type="LogProcessor", window_size=10, by_epoch=False)
log_level = "INFO"

load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
