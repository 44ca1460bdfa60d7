# Region proposal network from torchvision's detection pieces, anchors at every pyramid level.
proposer = dict(
    type="RPNProposer",
    anchor_scales=(8.0,),
    aspect_ratios=(0.5, 1.0, 2.0),
    post_nms_top_n=dict(training=300, testing=300),
    nms_thresh=0.7,
)
