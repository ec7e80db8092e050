"""mtl: a config-driven command-line trainer for multi-task learning in computer vision."""

__version__ = "0.1.0"
