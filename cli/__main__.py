"""``python -m cli``: the ``uap`` command without its console script."""
from cli import main

main()
