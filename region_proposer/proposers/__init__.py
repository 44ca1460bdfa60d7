"""One file per proposer (``FeaturePyramid -> Proposals``), each registered in ``MODELS``."""
