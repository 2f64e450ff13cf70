"""Transferability (the paper's Figure 3): how often a source model's adversarial examples fool other models.

The paper trains several architectures on D_det and finds that the better an architecture learns from D_det
(test accuracy on the real test set), the more often adversarial examples of the source model transfer to
it: non-robust features are shared across models.

Examples:
    >>> import torch, advfeat as af
    >>> from torch.utils.data import TensorDataset
    >>> _ = torch.manual_seed(0)
    >>> src = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> data = TensorDataset(torch.rand(64, 1, 2, 2), torch.randint(0, 2, (64,)))
    >>> af.transfer_rates(src, {"itself": src}, data, af.L2PGD(1.0, steps=5))  # a model fools itself
    {'itself': 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .adapters import batch_xy, classifier
from .attacks import Attack
from .guard import device_of, frozen_model

__all__ = ["transfer_rates"]


def transfer_rates(
    source: nn.Module,
    targets: Mapping[str, nn.Module],
    data: DataLoader[Any] | Dataset[Any],
    attack: Attack,
    *,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """For each target model: the fraction of the examples that ``attack`` crafts on ``source`` (from the
    samples of ``data`` that both classify correctly) that the target misclassifies.

    Untargeted attacks; a sample counts only if the source was fooled by its example and the target got the
    clean sample right, so the rate measures transfer, not the target's own errors.
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"attack must be an advfeat Attack, got {attack!r}")
    if not targets:
        raise ValueError("targets must name at least one model")
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
    dev = device_of(source, device)
    fooled = {k: 0 for k in targets}
    counted = {k: 0 for k in targets}
    source = classifier(source)
    wrapped = {k: classifier(m) for k, m in targets.items()}
    for batch in loader:
        x, y = batch_xy(batch)
        x, y = x.to(dev), y.to(dev)
        x_adv = attack(source, x, y)
        with torch.no_grad(), frozen_model(source):
            src_fooled = source(x_adv).argmax(1) != y
        for name, model in wrapped.items():
            with torch.no_grad(), frozen_model(model):
                ok = model(x).argmax(1) == y
                wrong = model(x_adv).argmax(1) != y
            keep = ok & src_fooled
            counted[name] += int(keep.sum())
            fooled[name] += int((keep & wrong).sum())
    return {k: fooled[k] / counted[k] if counted[k] else float("nan") for k in targets}
