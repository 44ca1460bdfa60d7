# Stage 1 on CPU: tiny ViT + tiny Deformable DETR proposer on the synthetic grounded scenes.
# Swap the proposer by changing the "tiny/proposers/ddetr.py" line (detr, rpn, gt), or with
# --cfg-options preset=tiny/proposers/gt.
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/datasets/synthetic_boxes.py",
    "../_base_/schedules/iter_2k_adamw.py",
    "../_base_/models/proposer_vit-tiny.py",
    "../tiny/proposers/ddetr.py",
]
default_scope = "region_proposer"

model = dict(
    type="ProposerPretrainer",
    backbone={{_base_.backbone}},
    proposer={{_base_.proposer}},
    data_preprocessor={{_base_.data_preprocessor}},
)
default_hooks = dict(
    checkpoint=dict(interval=500, max_keep_ckpts=1, save_best="proposer/AR@100", rule="greater")
)
