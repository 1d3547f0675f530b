"""``python -m lightning_bayes ...``: the ``lightning-bayes`` command without the console script on ``PATH``."""

import sys

from .cli import main

sys.argv[0] = "python -m lightning_bayes"  # the usage line's program name (argparse's is __main__.py)
main()
