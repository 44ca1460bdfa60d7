"""Stage-1 class-agnostic detection pre-training: model wrapper, box datasets, transforms."""
