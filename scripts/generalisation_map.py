"""``advfeat map`` as a script, for the commands the docs and earlier runs give: the same options and functions
(``advfeat.generalisation_map``)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, as `advfeat map` does

from advfeat.generalisation_map import *  # noqa: F403
from advfeat.generalisation_map import main

if __name__ == "__main__":
    raise SystemExit(main())
