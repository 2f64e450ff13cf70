"""AutoAttack (Croce and Hein, ICML 2020), the cascade behind RobustBench's numbers, as one ``Attack``.

``version="standard"``: APGD-CE, APGD-T (the targeted DLR loss, 9 target classes), FAB-T (9 target classes) and
Square (5,000 queries), each with the reference's settings (100 steps, one restart), in that order, each run only
on the samples every earlier attack left robust. ``version="rand"``, for models with randomness at inference:
APGD-CE and APGD-DLR with the gradient averaged over 20 draws of the model (``EOT``). ``version="malt"``: APGD-CE,
APGD-T on the 5 target classes MALT ranks nearest (Melamed, Yehudai and Shamir, NeurIPS 2024: the linearised
distance to each class's boundary), then FAB-T on one target (the likeliest wrong class), no Square: about 6 times
fewer passes than the standard version, and no weaker on the 24 rows docs/benchmarks.md measures.

A sample counts as broken by the first attack whose point the model misclassifies; the cascade returns that point.
A sample no attack broke gets the candidate with the highest cross-entropy among those tried (the worst case, so
that the cascade also serves as a training method's attack), or its clean point when it was misclassified to
begin with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import cost
from .._checks import check_logits
from ..threat import ThreatModel
from .apgd import APGD
from .base import Attack, BallAttack, Criterion, Outcome, keep, towards
from .compose import EOT
from .fab import FAB
from .losses import dlr
from .square import Square

__all__ = ["AutoAttack"]

VERSIONS = ("standard", "rand", "malt")
MALT_TARGETS = 5
"""The target classes of the ``"malt"`` version's APGD-T (MALT's nearest five, against the standard's nine by
confidence): docs/benchmarks.md measures it against the standard cascade and sets it by a rule."""
MALT_FAB_TARGETS = 1
"""The target classes of the ``"malt"`` version's FAB-T (the likeliest wrong one, against the standard's nine): it
breaks images that no APGD breaks (docs/benchmarks.md)."""


@dataclass(frozen=True, eq=False, repr=False)
class AutoAttack(BallAttack):
    """The AutoAttack cascade in the ``norm`` (``"linf"`` or ``"l2"``) ball of radius ``eps``, inside the box
    ``[lower, upper]``, or in ``threat=af.LinfBall(...)`` / ``af.L2Ball(...)`` (eps a float or a per-sample (N,)
    tensor). The standard version needs at least 4 classes (APGD-T's loss), the rand version 3. ``criterion``
    (default: misclassified) decides what counts as broken, in the cascade and in every part.

    ``parts(classes)`` lists the attacks of the cascade, in order, for a model with that many classes.

    Examples:
        >>> import torch, advfeat as af
        >>> aa = af.AutoAttack("linf", 8 / 255)
        >>> [name for name, _ in aa.parts(10)]
        ['apgd-ce', 'apgd-t', 'fab-t', 'square']
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
        >>> x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 5, (4,))
        >>> x_adv = af.AutoAttack("linf", 8 / 255, steps=5, queries=20)(model, x, y)
        >>> bool(((x_adv - x).abs() <= 8 / 255 + 1e-6).all())
        True
    """

    norm: str | None = None
    eps: float | Tensor | None = None
    version: str = "standard"
    seed: int | None = field(default=None, kw_only=True)
    steps: int = field(default=100, kw_only=True)
    queries: int = field(default=5000, kw_only=True)
    draws: int = field(default=20, kw_only=True)
    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)
    threat: ThreatModel | None = field(default=None, kw_only=True)
    criterion: Criterion | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        BallAttack.__post_init__(self)
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(map(repr, VERSIONS))}, got {self.version!r}")
        self.parts(10)  # the parts validate steps, queries and draws

    def parts(self, classes: int) -> tuple[tuple[str, Attack], ...]:
        """The cascade's attacks, by name, in order, for a model of ``classes`` classes (up to 9 targets)."""
        t, c, steps = self.threat_model(), self.criterion, self.steps
        targets = max(1, min(9, classes - 1))
        ce = APGD(threat=t, criterion=c, steps=steps)
        if self.version == "rand":
            return (("apgd-ce", EOT(ce, self.draws)),
                    ("apgd-dlr", EOT(APGD(threat=t, criterion=c, steps=steps, loss=dlr), self.draws)))
        if self.version == "malt":
            return (("apgd-ce", ce),
                    ("apgd-t", APGD(threat=t, criterion=c, steps=steps, loss=dlr, targets="malt",
                                    n_target_classes=min(MALT_TARGETS, targets))),
                    ("fab-t", FAB(threat=t, criterion=c, steps=steps, n_target_classes=MALT_FAB_TARGETS)))
        return (("apgd-ce", ce),
                ("apgd-t", APGD(threat=t, criterion=c, steps=steps, loss=dlr, n_target_classes=targets)),
                ("fab-t", FAB(threat=t, criterion=c, steps=steps, n_target_classes=targets)),
                ("square", Square(threat=t, criterion=c, queries=self.queries)))

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            logits = model(x)
        classes = check_logits(logits, y)
        if classes < (4 if self.version == "standard" else 3):
            raise ValueError(f"model: AutoAttack's {self.version} version needs at least "
                             f"{4 if self.version == 'standard' else 3} classes (the DLR losses), got {classes}")
        out = x.clone()
        best = self.outcome(model, x, y)
        alive = (~best.success).nonzero().squeeze(1)
        for name, attack in self.parts(classes):
            if alive.numel() == 0:
                break
            xs, ys = x.index_select(0, alive), y.index_select(0, alive)
            with cost.part(name):  # each part's passes apart, in an evaluation's count
                cand = towards(attack.select(alive).for_evaluation(True).run(model, xs, ys, generator).detach(), xs)
            new = (cand, self.outcome(model, cand, ys))
            old = (out.index_select(0, alive), Outcome(best.success[alive], best.score[alive]))
            kept, o = keep(new[1].better_than(old[1]), new, old)
            out.index_copy_(0, alive, kept)
            best.success[alive], best.score[alive] = o.success, o.score
            alive = alive[~o.success]  # one host sync per attack of the cascade
        return out
