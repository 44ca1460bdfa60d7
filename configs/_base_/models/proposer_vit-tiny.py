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
