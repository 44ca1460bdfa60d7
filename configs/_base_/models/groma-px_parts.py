# The groma_px parts between perception and the LLM: region selection, region encoder, image
# tokens. Widths and levels are derived from the backbone and the LLM when the model is built.
selector = dict(  # RegionSelector: Groma adds GT boxes (low score) in training only
    type="RegionSelector", score_thr=0.1, nms_thr=0.5, top_k=30, use_gt=True, gt_score=0.3
)
region_encoder = dict(  # RoIRegionEncoder: multi-level RoIAlign + box-position embedding
    type="RoIRegionEncoder", roi_size=4, hidden_dim=512, fusion="sum", box_embed=True
)
image_tokenizer = dict(type="ImageTokenizer", grid=4, mode="merge", level=-1)  # 16 image tokens
