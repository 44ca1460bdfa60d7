"""``BaseMetric`` subclasses: REC accuracy, grounded chat, counting, mask IoU."""
