"""``python -m advfeat replicate ...``: the same as the ``advfeat`` console script."""

import sys

from .cli import main

sys.exit(main())
