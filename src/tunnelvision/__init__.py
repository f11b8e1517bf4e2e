"""tunnelvision: zero-shot detection and segmentation (Grounded-SAM) as an HTTP API."""

__version__ = "0.1.0"
