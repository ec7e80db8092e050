"""torchmetrics Metric classes for what no library metric covers, one file per family of tasks.

The classes are imported on first use (PEP 562), so that what needs only delta_m.py (mtl report) does not import
torch."""

import importlib

FAMILIES = {"DepthMetrics": "dense", "NormalMetrics": "dense", "SegmentationMetrics": "dense",
            "DetectionMAP": "detection", "AttributeMetrics": "faces", "IdentificationAccuracy": "faces",
            "LandmarkNME": "faces", "VerificationMetrics": "faces"}
__all__ = sorted(FAMILIES)


def __getattr__(name: str):
    if name not in FAMILIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{FAMILIES[name]}"), name)
