"""``uap`` for torchrun in the tests: ``python tests/train_entry.py [--fail-on-rank R] ARGS`` runs
``uap ARGS`` through the console script's :func:`cli.main`; with ``--fail-on-rank R`` the
training step of rank ``R`` raises a ``ValueError`` (a rank that fails while its peers train)."""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--fail-on-rank"]:
        failing, args = int(args[1]), args[2:]
        if int(os.environ.get("RANK", "0")) == failing:
            from models.methods import TrainingMethod
            from models.methods.simclr import SimCLR

            def refuse(self: TrainingMethod, *_args, **_kwargs):
                raise ValueError(f"this method refuses to train on rank {failing}")

            SimCLR.training_step = refuse
    sys.argv = ["uap", *args]
    from cli import main

    main()
