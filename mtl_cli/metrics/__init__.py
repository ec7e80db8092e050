"""torchmetrics Metric classes for what no library metric covers, one file per family of tasks."""

from mtl_cli.metrics.dense import DepthMetrics, NormalMetrics, SegmentationMetrics
from mtl_cli.metrics.detection import DetectionMAP
from mtl_cli.metrics.faces import AttributeMetrics, IdentificationAccuracy, LandmarkNME, VerificationMetrics

__all__ = ["AttributeMetrics", "DepthMetrics", "DetectionMAP", "IdentificationAccuracy", "LandmarkNME",
           "NormalMetrics", "SegmentationMetrics", "VerificationMetrics"]
