# Class-agnostic boxes of the synthetic grounded scenes (stage-1 proposer training and recall).
data_root = "work_dirs/quickstart/data"
dataset_type = "CocoBoxDataset"
# Longer side for validation and testing. The images are 132-320 px and their objects small;
# trained at 192-256, the 2k-iteration proposer scores test AR@100 0.736 at 224, 0.777 at 256,
# 0.798 at 288 and 0.799 at 320 (docs/NOTES.md, "Training on these machines").
image_size = 288

# The synthetic images decode once per process and stay in memory (~220 MB for all 1,400).
train_pipeline = [
    dict(type="LoadImage", cache_mb=512),
    dict(type="Resize", max_size=(192, 208, 224, 240, 256)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="RandomCrop", prob=0.3, crop_ratio_range=(0.7, 1.0), min_area_ratio=0.5),
    dict(type="PackProposerInputs"),
]
test_pipeline = [
    dict(type="LoadImage", cache_mb=512),
    dict(type="Resize", max_size=image_size),
    dict(type="PackProposerInputs"),
]

train_dataloader = dict(
    batch_size=8,
    # Loaded in the main process from cached decoded images, as the chat stages: in stage 1
    # no reliable difference (0.669 s per step against 0.653 s with two workers,
    # benchmarks/results/bench_train_steps_length_groups.json; docs/NOTES.md, "Length groups,
    # cached images").
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_train_agnostic.json",
        source="synthetic",
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=16,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file="annotations/instances_val_agnostic.json",
        source="synthetic",
        pipeline=test_pipeline,
        test_mode=True,
    ),
)
test_dataloader = dict(
    val_dataloader,
    dataset=dict(val_dataloader["dataset"], ann_file="annotations/instances_test_agnostic.json"),
)

# The selection rule of the LLM's region set (score threshold, NMS, top-K); region-set recall
# measures the ceiling it leaves for referring accuracy.
region_selection = dict(score_thr=0.05, nms_thr=0.7, top_k=100)
val_evaluator = dict(type="ProposalRecallMetric", **region_selection)
test_evaluator = val_evaluator
