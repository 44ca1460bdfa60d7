# Stage 3 (instruction fine-tuning) of the tiny CPU pipeline: the LLM trains too (fully; use
# llm.lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) for LoRA instead).
# Starts from the stage-2 checkpoint.
_base_ = ["./groma-px_ddetr-vit-tiny_llama-tiny_stage2_synthetic.py"]
model = dict(frozen=("backbone", "proposer"))
load_from = "work_dirs/quickstart/stage2/iter_200.pth"

max_iters = 1000
train_cfg = dict(max_iters=max_iters, val_interval=max_iters + 1)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.05, by_epoch=False, begin=0, end=50),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=50, end=max_iters, eta_min=1e-5),
]
default_hooks = dict(checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
