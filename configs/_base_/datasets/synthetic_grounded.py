# Synthetic grounded scenes (tools/make_synthetic.py or tools/quickstart.py writes them).
data_root = "work_dirs/quickstart/data"
dataset_type = "GroundedConversationDataset"

_dataset = dict(  # GroundedConversationDataset
    type=dataset_type,
    data_root=data_root,
    on_bad_record="raise",
    check_images="decode",
)

train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(_dataset, ann_file="train.jsonl"),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type="DefaultSampler", shuffle=False),
    collate_fn=dict(type="pseudo_collate"),
    dataset=dict(_dataset, ann_file="val.jsonl", test_mode=True),
)
test_dataloader = dict(
    val_dataloader, dataset=dict(_dataset, ann_file="test.jsonl", test_mode=True)
)
