# Deformable DETR proposer (Groma's default): 6+6 layers, 300 queries, two-stage, box refinement.
# Objectness: one head per data source fused as Groma's coco^0.4 * sa1b^0.6.
proposer = dict(
    type="DeformableDETRProposer",
    embed_dim=256,
    num_heads=8,
    num_points=4,
    num_encoder_layers=6,
    num_decoder_layers=6,
    ffn_dim=1024,
    num_queries=300,
    two_stage=True,
    with_box_refine=True,
    objectness=dict(
        sources=("coco", "sa1b"), fusion=dict(rule="geometric", weights=dict(coco=0.4, sa1b=0.6))
    ),
)
