# Tiny GromaPX for CPU tests: 2-block 32-wide ViT, 8-query Deformable DETR, 2-layer 64-wide Llama
# (random init), 64-pixel images. Tests fill model.tokenizer, the pipelines' tokenizer and the
# dataloaders' data_root at run time (see tests/groma_px/conftest.py).
_base_ = ["../_base_/default_runtime.py", "../_base_/datasets/synthetic_chat.py"]

image_size = 64
train_pipeline = [
    dict(type="LoadGroundedRecord", with_mask=True),
    dict(type="RandomVisualPrompts", point_prob=0.2, mask_prob=0.2),
    dict(type="LoadImage"),
    dict(type="Resize", max_size=image_size),
    dict(
        type="PackGroundedChatInputs",
        tokenizer={{_base_.tokenizer_dir}},
        template="plain",
        mode="train",
        region_label_fields={{_base_.region_label_fields}},
    ),
]
test_pipeline = [
    dict(type="LoadGroundedRecord", with_mask=True),
    dict(type="LoadImage"),
    dict(type="Resize", max_size=image_size),
    dict(
        type="PackGroundedChatInputs",
        tokenizer={{_base_.tokenizer_dir}},
        template="plain",
        mode="predict",
    ),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=train_pipeline)
)
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline)
)
test_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline)
)

model = dict(
    type="GromaPX",
    backbone=dict(  # VisionBackbone
        type="VisionBackbone",
        encoder=dict(  # TimmViTEncoder
            type="TimmViTEncoder",
            model_name="vit_tiny_patch16_224",
            img_size=image_size,
            depth=2,
            embed_dim=32,
            num_heads=2,
        ),
        outputs=dict(
            proposer=dict(blocks=(-2, -1), fuse="mean", scales=(2.0, 1.0, 0.5), out_channels=32),
        ),
    ),
    proposer=dict(  # in_channels derived from the backbone
        type="DeformableDETRProposer",
        embed_dim=32,
        num_heads=2,
        num_points=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        ffn_dim=64,
        num_queries=8,
        two_stage=True,
        with_box_refine=True,
        objectness=dict(sources=("synthetic",)),
    ),
    region_encoder=dict(type="RoIRegionEncoder", roi_size=2, hidden_dim=32, pixel_roi_size=4),
    image_tokenizer=dict(type="ImageTokenizer", grid=2, mode="merge", level=-1),
    # score_thr=0: a random-init proposer scores about its 0.01 prior, and predict must still
    # keep proposals for the tests to see.
    selector=dict(type="RegionSelector", score_thr=0.0, nms_thr=0.7, top_k=8, gt_score=0.3),
    llm=dict(
        type="GroundedCausalLM",
        config=dict(  # LlamaConfig; vocab_size derived from the tokenizer
            model_type="llama",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        attn_implementation="sdpa",
    ),
    tokenizer={{_base_.tokenizer_dir}},
    layout="pair",
    frozen=("backbone", "proposer"),
    max_new_tokens=8,
    region_head="pointer",
    region_pointer=dict(phrase_query=True),
    copy_head=dict(),
    region_text_loss=dict(),
    describe_head=dict(),
    mask_head=dict(type="LLMMaskHead", embed_dim=16, hidden_dim=32),
    mask_loss=dict(num_points=256, max_masks=8),
    data_preprocessor=dict(type="ProposerDataPreprocessor", pad_size_divisor=16),
)

train_cfg = dict(type="IterBasedTrainLoop", max_iters=2, val_interval=3)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.0))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2, max_keep_ckpts=1))
