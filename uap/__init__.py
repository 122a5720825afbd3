"""uap — universal adversarial perturbations.

The public API is re-exported here; see README.md for a tour.
"""
from __future__ import annotations

__version__ = "0.1.0"

from uap import data  # noqa: E402

__all__ = ["__version__", "data"]
