# Grounded conversations of the synthetic scenes (stages 2 and 3): every task of train.jsonl
# (res included), evaluated by generation on the test split. Region masks are decoded and moved
# with the pixels (gt_masks) for the mask head; mask metrics score at original resolution.
data_root = "work_dirs/quickstart/data"
tokenizer_dir = "work_dirs/quickstart/tokenizer"
template = "plain"
image_size = 224  # longer side after resizing; within stage 1's training scales (192-256)
region_label_fields = ("attributes.size", "attributes.color", "category")

train_pipeline = [
    dict(type="LoadGroundedRecord", with_mask=True),
    dict(type="RandomVisualPrompts", point_prob=0.2, mask_prob=0.2),  # box/point/mask prompts
    dict(type="LoadImage", cache_mb=512),  # decoded once per process (synthetic_boxes.py)
    dict(type="Resize", max_size=image_size),
    dict(
        type="PackGroundedChatInputs",
        tokenizer=tokenizer_dir,
        template=template,
        mode="train",
        # Each region's words, for GromaPX(region_text_loss=...): size, colour, shape (noun last).
        region_label_fields=region_label_fields,
    ),
]
test_pipeline = [
    dict(type="LoadGroundedRecord", with_mask=True),
    dict(type="LoadImage", cache_mb=512),
    dict(type="Resize", max_size=image_size),
    dict(type="PackGroundedChatInputs", tokenizer=tokenizer_dir, template=template, mode="predict"),
]
train_dataloader = dict(
    batch_size=16,
    # In the main process: stage-3 step 0.704 s against 0.762 s with two workers
    # (benchmarks/results/bench_train_steps_length_groups.json).
    num_workers=0,
    persistent_workers=False,
    # dict(type="LengthGroupedSampler", batch_size=16) pads the LLM's batches less (79 % of
    # positions real, 59 % shuffled) but lost relational REC (0.67 -> 0.36; docs/NOTES.md,
    # "Faster evaluation").
    sampler=dict(type="InfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        type="GroundedConversationDataset",
        data_root=data_root,
        ann_file="train.jsonl",
        check_images="exists",
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    # Batches of one task: generation runs until a batch's longest answer ends, and in file
    # order nearly every batch held a grounded caption (docs/NOTES.md, "Faster evaluation").
    sampler=dict(type="TaskGroupedSampler", window=1024),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(
        type="GroundedConversationDataset",
        data_root=data_root,
        ann_file="val.jsonl",
        check_images="exists",
        pipeline=test_pipeline,
        test_mode=True,
    ),
)
test_dataloader = dict(
    val_dataloader, dataset=dict(val_dataloader["dataset"], ann_file="test.jsonl")
)
val_evaluator = [
    dict(type="RECMetric"),
    dict(type="RegionCaptionMetric"),
    dict(type="GroundedCaptionMetric"),
    dict(type="CountingMetric"),
    dict(type="RESMetric"),
    dict(type="RegionMaskAPMetric"),
]
test_evaluator = val_evaluator
