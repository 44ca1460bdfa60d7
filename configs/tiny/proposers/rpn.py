# Tiny RPN for CPU runs.
proposer = dict(
    type="RPNProposer",
    anchor_scales=(4.0, 8.0),
    aspect_ratios=(0.5, 1.0, 2.0),
    post_nms_top_n=dict(training=100, testing=100),
    nms_thresh=0.7,
)
