# Groma's perception backbone: DINOv2-L/14 at 448, frozen; the proposer reads the mean of the
# last 4 blocks through a ViTDet pyramid, the region encoder (stage 2) the last 3 as levels.
# Set encoder.pretrained to a local timm/DINOv2 checkpoint (file or directory); nothing downloads.
backbone = dict(
    type="VisionBackbone",
    encoder=dict(  # TimmViTEncoder
        type="TimmViTEncoder",
        model_name="vit_large_patch14_dinov2",
        img_size=448,
        frozen=True,
        pretrained=None,
    ),
    outputs=dict(
        proposer=dict(
            blocks=(-4, -3, -2, -1), fuse="mean", scales=(4.0, 2.0, 1.0, 0.5), out_channels=256
        ),
        region_encoder=dict(
            blocks=(-3, -2, -1), fuse="levels", scales=(4.0, 2.0, 1.0), out_channels=1024
        ),
    ),
)
data_preprocessor = dict(type="ProposerDataPreprocessor", pad_size_divisor=14)
