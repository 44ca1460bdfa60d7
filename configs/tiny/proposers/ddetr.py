# Tiny Deformable DETR proposer for CPU runs: 2+2 layers, 64 wide, 50 queries, two-stage.
proposer = dict(
    type="DeformableDETRProposer",
    embed_dim=64,
    num_heads=4,
    num_points=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    ffn_dim=256,
    num_queries=50,
    two_stage=True,
    with_box_refine=True,
    objectness=dict(sources=("synthetic",)),
)
