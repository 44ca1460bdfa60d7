"""``BaseMetric`` subclasses: REC accuracy, grounded chat, counting, referring segmentation and
region-mask AP."""

from .caption import GroundedCaptionMetric, RegionCaptionMetric, greedy_matches
from .counting import CountingMetric
from .rec import RECMetric
from .res_metric import RegionMaskAPMetric, RESMetric
from .task_metric import TaskMetric, cited_boxes
from .text import caption_tokens, parse_count, strip_markup

__all__ = [
    "CountingMetric",
    "GroundedCaptionMetric",
    "RECMetric",
    "RegionCaptionMetric",
    "RegionMaskAPMetric",
    "RESMetric",
    "TaskMetric",
    "caption_tokens",
    "cited_boxes",
    "greedy_matches",
    "parse_count",
    "strip_markup",
]
