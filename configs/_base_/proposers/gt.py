# Oracle: ground-truth boxes as proposals (ablations and upper bounds).
proposer = dict(type="GroundTruthProposer", jitter=0.0, drop_rate=0.0, num_distractors=0)
