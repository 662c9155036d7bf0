"""The version of knowpatch, in a module of its own (imported by manifests and reports
without importing the package)."""

__version__ = "0.1.0"
