"""Proposal metrics: class-agnostic average recall and region-set recall."""

from .recall import ProposalRecallMetric, average_recall

__all__ = ["ProposalRecallMetric", "average_recall"]
