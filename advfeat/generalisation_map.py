"""The generalisation map, by its first name: ``advfeat.replicate.map`` (the map) and
``advfeat.replicate.map_cli`` (``advfeat map``). Everything they export is here too."""

from .replicate.map import *  # noqa: F403
from .replicate.map import __all__ as _map_all
from .replicate.map import __doc__ as __doc__  # noqa: F401
from .replicate.map_cli import add_arguments, main, run

__all__ = [*_map_all, "add_arguments", "run", "main"]
