"""The version of sharedctx (read by packaging and written into adapters)."""

__version__ = "0.1.0"
