"""Imported first by the package: a torch older than ``advfeat._version.TORCH_FLOOR`` is refused, naming both."""

import torch

from ._version import check_torch

check_torch(torch.__version__)
