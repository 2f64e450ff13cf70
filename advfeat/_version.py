"""The package's version and the oldest torch it runs on, each in one place (pyproject.toml and README.md state
the same floor; the suite checks that they do)."""

__version__ = "0.2.0"

TORCH_FLOOR = (2, 3)
"""The oldest torch release advfeat runs on: ``torch.amp.GradScaler(device_type)`` appeared in torch 2.3."""


def check_torch(version: str) -> None:
    """Refuse a torch older than ``TORCH_FLOOR``, naming both (``version``: ``torch.__version__``)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"advfeat needs torch >= {floor}, found torch {version}: pip install 'torch>={floor}'")
