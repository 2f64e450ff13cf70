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
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .adapters import check_keys, classifier
from .attacks import Attack
from .guard import device_of, frozen_model
from .tally import checked_batches

__all__ = ["transfer_rates"]


def transfer_rates(
    source: nn.Module,
    targets: Mapping[str, nn.Module],
    data: DataLoader[Any] | Dataset[Any],
    attack: Attack,
    *,
    device: str | torch.device | None = None,
    keys: tuple[str, str] | None = None,
) -> dict[str, float]:
    """For each target model: the fraction of the examples that ``attack`` crafts on ``source`` that the target
    misclassifies, counted over the samples the target classifies correctly clean and whose example fools the
    source (so the rate measures transfer, not the target's own errors). Untargeted attacks.

    The batches are read and checked as ``evaluate`` reads them (``advfeat.tally.checked_batches``: the attack's
    box, labels, the models' devices, non-finite logits of the source and of every target refused); ``keys`` names
    the image and label of mapping batches. Counts stay on the device until the end. A target for which no sample
    counts has no rate: refused, naming it.
    """
    if not isinstance(attack, Attack):
        raise TypeError(f"attack must be an advfeat Attack, got {attack!r}")
    if not targets:
        raise ValueError("targets must name at least one model")
    keys = check_keys(keys)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
    dev = device_of(source, device)
    wrapped = {k: classifier(m) for k, m in targets.items()}
    fooled: dict[str, Tensor | int] = {k: 0 for k in targets}
    counted: dict[str, Tensor | int] = {k: 0 for k in targets}
    finite = {k: torch.ones((), dtype=torch.bool, device=dev) for k in targets}
    with frozen_model(classifier(source)) as src:
        for _, x, y, _ in checked_batches(loader, src, keys, attack.box, dev, what="data"):
            x_adv = attack(src, x, y)
            with torch.no_grad():
                src_fooled = src(x_adv).argmax(1) != y
            for name, model in wrapped.items():
                with torch.no_grad(), frozen_model(model):
                    clean, moved = model(x), model(x_adv)
                finite[name] &= torch.isfinite(clean).all() & torch.isfinite(moved).all()
                keep = (clean.argmax(1) == y) & src_fooled
                counted[name] = counted[name] + keep.sum()
                fooled[name] = fooled[name] + (keep & (moved.argmax(1) != y)).sum()
    rates = {}
    for name in targets:
        if not bool(finite[name]):
            raise FloatingPointError(f"targets[{name!r}] returned non-finite logits (NaN or inf): no transfer rate "
                                     "is reported for it")
        if int(counted[name]) == 0:
            raise ValueError(f"targets[{name!r}]: no sample counts (none that it classifies correctly has an example "
                             "that fools the source), so there is no rate to report; give more data or a stronger "
                             "attack")
        rates[name] = int(fooled[name]) / int(counted[name])
    return rates
