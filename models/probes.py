"""The probes (linear probe, weighted kNN) live in the engine, :mod:`uap.probes`; this name
stays for the zoo's code and for users who import ``models.probes``."""
from __future__ import annotations

from uap.probes import *  # noqa: F401,F403
from uap.probes import __all__  # noqa: F401
