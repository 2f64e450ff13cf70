"""Per-sample attack losses: ``(logits (N, C), labels (N,)) -> (N,)``, computed in float32 (also under autocast)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossFn", "cross_entropy", "cw_margin", "dlr", "dlr_targeted"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(logits (N, C), labels (N,)) -> per-sample loss (N,)``; the attack raises it (or lowers it, targeted)."""


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, computed in float32 (also under autocast)."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` per sample: positive once the label is lost.

    Targeted attacks minimise it with ``y`` = targets, which drives ``z_t`` above every other logit.
    """
    z = logits.float()
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return others - zy


def dlr(logits: Tensor, y: Tensor) -> Tensor:
    """The difference-of-logits-ratio loss of Croce & Hein (2020), per sample:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, with ``z_pi1 >= z_pi2 >= ...`` the sorted logits.

    Unlike cross-entropy it does not change when the logits are shifted or scaled, so a model cannot hide
    behind large or saturated logits. Positive once the label is lost. Needs at least 3 classes.

    Examples:
        >>> import torch
        >>> dlr(torch.tensor([[4.0, 2.0, 0.0]]), torch.tensor([0]))
        tensor([-0.5000])
    """
    z = logits.float()
    if z.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got logits of shape {tuple(z.shape)}")
    top = z.topk(3, dim=1).values
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return (others - zy) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """The targeted DLR loss of APGD-T: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` per sample; the
    attack raises it to push the target ``t`` above the true label ``y``. Needs at least 4 classes."""
    z = logits.float()
    if z.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got logits of shape {tuple(z.shape)}")
    top = z.topk(4, dim=1).values
    zy, zt = z.gather(1, y[:, None]).squeeze(1), z.gather(1, target[:, None]).squeeze(1)
    return (zt - zy) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
