"""The package version, apart from ``commer/__init__`` so that low layers (checkpoints) can read it."""

__version__ = "0.1.0"
