"""Proposal metrics: class-agnostic average recall and region-set recall."""
