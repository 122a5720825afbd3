"""Target models built in this repo: backbones, SSL methods, CLIP, probes and the zoo."""
from __future__ import annotations
