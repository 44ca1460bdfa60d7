# Plain DETR proposer: a transformer decoder over one pyramid level.
proposer = dict(
    type="DETRProposer",
    embed_dim=256,
    num_heads=8,
    num_decoder_layers=6,
    ffn_dim=1024,
    num_queries=300,
)
