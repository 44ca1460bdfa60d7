# Paper-scale stage 1 (Groma): frozen DINOv2-L/14 at 448, Deformable DETR 6+6 layers, 300
# queries, two-stage, objectness heads for COCO and SA-1B fused as coco^0.4 * sa1b^0.6.
# Needs converted COCO-format box files under data_root and a local DINOv2 checkpoint
# (model.backbone.encoder.pretrained); builds without weights (e.g. on the meta device).
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/schedules/iter_2k_adamw.py",
    "../_base_/models/proposer_dinov2-l.py",
    "../_base_/proposers/ddetr.py",
]
default_scope = "region_proposer"
data_root = "data/"

model = dict(
    type="ProposerPretrainer",
    backbone={{_base_.backbone}},
    proposer={{_base_.proposer}},
    data_preprocessor={{_base_.data_preprocessor}},
)

train_pipeline = [
    dict(type="LoadImage"),
    dict(type="Resize", max_size=(384, 416, 448)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="RandomCrop", prob=0.3, crop_ratio_range=(0.6, 1.0)),
    dict(type="PackProposerInputs"),
]
test_pipeline = [
    dict(type="LoadImage"),
    dict(type="Resize", max_size=448),
    dict(type="PackProposerInputs"),
]
_coco = dict(type="CocoBoxDataset", data_root=data_root + "coco/", source="coco")
train_dataloader = dict(
    batch_size=8,
    num_workers=8,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        type="ConcatDataset",
        datasets=[
            dict(_coco, ann_file="annotations/instances_train2017.json", pipeline=train_pipeline),
            dict(
                type="CocoBoxDataset",
                data_root=data_root + "sa1b/",
                source="sa1b",
                ann_file="annotations/sa1b_boxes.json",
                pipeline=train_pipeline,
            ),
        ],
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=8,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        _coco, ann_file="annotations/instances_val2017.json", pipeline=test_pipeline, test_mode=True
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    type="ProposalRecallMetric", score_thr=0.15, nms_thr=0.6, top_k=100, dataset_name="coco"
)
test_evaluator = val_evaluator
train_cfg = dict(max_iters=60000, val_interval=5000)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", by_epoch=False, milestones=[50000], gamma=0.1),
]
