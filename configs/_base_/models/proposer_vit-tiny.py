# Tiny ViT backbone for the CPU synthetic setup (stage 1): patch 16, 4 blocks, 192 wide, trained.
backbone = dict(
    type="VisionBackbone",
    encoder=dict(  # TimmViTEncoder
        type="TimmViTEncoder",
        model_name="vit_tiny_patch16_224",
        img_size=224,
        depth=4,
        embed_dim=192,
        num_heads=3,
        frozen=False,
    ),
    outputs=dict(
        proposer=dict(blocks=(-2, -1), fuse="mean", scales=(2.0, 1.0, 0.5), out_channels=96),
    ),
)
data_preprocessor = dict(type="ProposerDataPreprocessor", pad_size_divisor=16)
# BoxRefiner (no "type": the stage-1 and chat models build it): a RoI stage that tightens the
# proposer's boxes from a 32x32 crop of the input pixels (1.5x the box), applied twice to the
# proposals scoring >= 0.05 (the region-set rule's threshold). Trained in stage 1 on jittered
# ground-truth boxes, frozen in the chat stages (docs/NOTES.md, "Box refiner").
box_refiner = dict(
    roi_size=32, context=1.5, width=16, num_steps=2, train_views=4, jitter=0.08, score_thr=0.05
)
