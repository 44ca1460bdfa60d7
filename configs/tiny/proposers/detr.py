# Tiny plain-DETR proposer for CPU runs.
proposer = dict(
    type="DETRProposer",
    embed_dim=64,
    num_heads=4,
    num_decoder_layers=2,
    ffn_dim=256,
    num_queries=50,
    objectness=dict(sources=("synthetic",)),
)
