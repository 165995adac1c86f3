"""The package version (a leaf: the writer records it in every index it writes)."""

__version__ = "0.1.0"
