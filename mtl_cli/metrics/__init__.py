"""torchmetrics Metric classes for what no library metric covers, one file per family of tasks."""

from mtl_cli.metrics.dense import DepthMetrics, NormalMetrics, SegmentationMetrics

__all__ = ["DepthMetrics", "NormalMetrics", "SegmentationMetrics"]
