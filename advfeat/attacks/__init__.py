"""Attacks: small, immutable configurations of the one engine, called with the model.

``x_adv = attack(model, x, y)``. An attack is a frozen dataclass: printable, comparable, reusable across
models and devices. ``y`` holds the true labels, or the targets when ``targeted=True``.

Every attack call, built in or user-written, goes through ``Attack.__call__``, which

1. validates ``x`` (a finite floating tensor inside the attack's box) and ``y`` (integer labels, shape (N,),
   checked against the model's classes at its first forward),
2. guards the model (``advfeat.guard.frozen_model``): runs it in eval mode and with ``requires_grad=False`` on
   every parameter, and afterwards restores every module's ``training`` flag, every parameter's
   ``requires_grad`` and every buffer exactly (``.grad`` is never touched: gradients are taken with
   respect to the input only),
3. calls ``Attack.run``, the one method a subclass writes, and returns a new tensor of ``x``'s
   dtype and device.

A module per family: ``base`` (``Attack``, ``Outcome``, the success criteria), ``losses``, ``gradient`` (the
engine-backed ``GradientAttack`` and PGD, L2PGD, LinfPGD, FGSM), ``apgd``, ``fab`` (the minimum-norm FAB),
``square`` (the gradient-free Square Attack), ``autoattack`` (the cascade) and ``compose`` (Restarts, WorstOf,
EOT).

Examples:
    >>> import torch, advfeat as af
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> attack = af.L2PGD(0.5, steps=20)
    >>> attack
    L2PGD(eps=0.5, steps=20)
    >>> x_adv = attack(model, x, y)
    >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
    True
"""

from ..guard import frozen_model
from .apgd import APGD
from .autoattack import AutoAttack
from .base import Attack, BallAttack, Criterion, Misclassified, Outcome, ReachedTarget
from .compose import EOT, FixedRandomness, Restarts, WorstOf
from .fab import FAB
from .gradient import FGSM, L2PGD, PGD, GradientAttack, LinfPGD
from .losses import LossFn, cross_entropy, cw_margin, dlr, dlr_targeted
from .square import Square

EnginePGD = GradientAttack
"""The name ``GradientAttack`` had before it was public (kept as an alias)."""

__all__ = [
    "Attack", "GradientAttack", "PGD", "L2PGD", "LinfPGD", "FGSM", "APGD", "FAB", "Square", "AutoAttack", "Restarts",
    "WorstOf", "EOT", "FixedRandomness", "BallAttack",
    "Outcome",
    "Criterion", "Misclassified", "ReachedTarget",
    "cross_entropy", "cw_margin", "dlr", "dlr_targeted", "frozen_model", "LossFn", "EnginePGD",
]
