"""Single source of the package version (read by setup via pyproject's dynamic version)."""

__version__ = "0.1.0"
