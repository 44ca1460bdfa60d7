# Oracle proposer (ground-truth boxes) for ablations; no parameters.
proposer = dict(type="GroundTruthProposer", jitter=0.0, drop_rate=0.0, num_distractors=0)
