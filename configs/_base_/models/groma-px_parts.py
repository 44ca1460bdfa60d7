# The groma_px parts between perception and the LLM: region selection, region encoder, image
# tokens. Widths and levels are derived from the backbone and the LLM when the model is built.
# RegionSelector: Groma adds GT boxes (low score) in training only. Outside training a looser
# rule (test_cfg) keeps about twice the regions: on the qs_ev2 model, val REC 0.882 -> 0.894 and
# test 0.884 -> 0.893, ceiling 0.962 -> 0.973 (benchmarks/bench_selection.py; docs/NOTES.md,
# "A looser region set at test time"). Training with it did no better (one run).
selector = dict(
    type="RegionSelector",
    score_thr=0.1,
    nms_thr=0.5,
    top_k=30,
    use_gt=True,
    gt_score=0.3,
    test_cfg=dict(score_thr=0.05, nms_thr=0.6),
)
region_encoder = dict(  # RoIRegionEncoder: multi-level RoIAlign + box-position embedding,
    # plus a 16x16 RoIAlign of the input pixels (colour and fine shape; docs/NOTES.md)
    type="RoIRegionEncoder",
    roi_size=4,
    hidden_dim=512,
    fusion="sum",
    # True: normalised (x0, y0, x1, y1, w, h); "shorter_side" adds the box's extent in units of
    # the image's shorter side (opt-in: REC 0.786 vs 0.779, within noise; docs/NOTES.md).
    box_embed=True,
    pixel_roi_size=16,
    pixel_head="mlp",  # "cnn": no gain at this budget, even with 5,000 images (docs/NOTES.md)
)
image_tokenizer = dict(type="ImageTokenizer", grid=4, mode="merge", level=-1)  # 16 image tokens
# Masks for cited regions from the same pyramid (+ a stem on the image), conditioned on the LLM
# state that cited the region; QueryMaskHead is the LLM-free alternative.
mask_head = dict(type="LLMMaskHead", embed_dim=32, mask_stride=4, refine_layers=1)
