# Tiny Deformable DETR proposer for CPU runs: 2+3 layers, 64 wide, 100 queries, two-stage.
proposer = dict(
    type="DeformableDETRProposer",
    embed_dim=64,
    num_heads=4,
    num_points=4,
    num_encoder_layers=2,
    num_decoder_layers=3,
    ffn_dim=256,
    num_queries=100,
    two_stage=True,
    with_box_refine=True,
    objectness=dict(sources=("synthetic",)),
)
