# Proposals read from a cache written by tools/cache_proposals.py (set path with --cfg-options).
proposer = dict(type="CachedProposer", path="work_dirs/proposals/val.safetensors")
