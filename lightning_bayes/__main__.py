"""``python -m lightning_bayes ...``: the ``lightning-bayes`` command without the console script on ``PATH``."""

from .cli import main

main()
