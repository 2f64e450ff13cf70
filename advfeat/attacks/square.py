"""The Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): a score-based random search that never
takes a gradient, so a robustness that only blocks gradients (masking, shattering, a non-differentiable layer)
does not stop it. AutoAttack's gradient-free member.

Each iteration proposes one change inside a random square window, the same window for the whole batch, and keeps
it for a sample only where it lowers that sample's loss (the margin of the true class by default) or misclassifies
it. The window's side follows the reference's schedule: a share ``p`` of the image's pixels, ``p_init`` halved at
10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 queries, rescaled to the budget ``queries``. Linf: the
window's pixels move to a corner of the ball (``+-eps`` per channel). L2: a pseudo-Gaussian bump is added in one
window, the mass of a second window is moved into it, and the whole perturbation keeps norm ``eps``.

A sample leaves the batch once it is misclassified (reached its target, when targeted): after every query on the
CPU, at queries 1, 2, 4, 8, ... and every 64th on an accelerator (a host sync each), the rest of the time it stays
frozen in the batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from ..engine import _accelerated
from ..threat import ThreatModel, clamp, column, per_sample_norm
from .base import BallAttack, Criterion
from .losses import cw_margin

__all__ = ["Square"]

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
"""Where (of 10,000 queries) the reference halves the window's share of the image."""


@dataclass(frozen=True, eq=False, repr=False)
class Square(BallAttack):
    """The Square Attack in the Linf (default) or L2 ball of radius ``eps``, inside the box ``[lower, upper]``; or
    in ``threat=af.LinfBall(...)`` / ``af.L2Ball(...)`` (eps a float or a per-sample (N,) tensor).

    ``queries``: iterations, one forward pass each (the reference's default: 5,000); ``p_init``: the share of
    the image the first windows cover (0.8); ``score``: what the search lowers, ``"margin"`` (the true class's
    logit minus the largest other, the reference's default) or ``"ce"`` (minus the cross-entropy); targeted, the
    cross-entropy towards ``y``. A sample stops being searched once it is broken: misclassified (the target reached,
    when targeted) by default, or by ``criterion``. Images only: ``x`` of shape (N, C, H, W).

    Examples:
        >>> import torch, advfeat as af
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
        >>> x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))
        >>> x_adv = af.Square(8 / 255, queries=50)(model, x, y)
        >>> bool(((x_adv - x).abs() <= 8 / 255 + 1e-6).all())
        True
    """

    eps: float | Tensor | None = None
    norm: str = field(default="linf", kw_only=True)
    queries: int = field(default=5000, kw_only=True)
    p_init: float = field(default=0.8, kw_only=True)
    score: str = field(default="margin", kw_only=True)
    targeted: bool = field(default=False, kw_only=True)
    seed: int | None = field(default=None, kw_only=True)
    lower: float | Tensor = field(default=0.0, kw_only=True)
    upper: float | Tensor = field(default=1.0, kw_only=True)
    threat: ThreatModel | None = field(default=None, kw_only=True)
    criterion: Criterion | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        BallAttack.__post_init__(self)
        check_positive_int("queries", self.queries)
        if not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.score not in ("margin", "ce"):
            raise ValueError(f"score must be 'margin' or 'ce', got {self.score!r}")

    def share(self, query: int) -> float:
        """The share of the image a window covers at ``query`` (0-based): the reference's schedule."""
        at = int(query / self.queries * 10000)
        halvings = sum(at > h for h in _HALVINGS)
        return float(self.p_init) / float(2**halvings)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"Square attacks images: x must have shape (N, C, H, W), got {tuple(x.shape)}")
        with torch.no_grad():
            return _Search(self, model, x, y, generator).run()


class _Search:
    """One run of the search on a batch: the best point so far, its margin and loss, the samples still searched."""

    def __init__(self, attack: Square, model: nn.Module, x: Tensor, y: Tensor, g: torch.Generator | None) -> None:
        self.a, self.model, self.x, self.y, self.g = attack, model, x, y, g
        t = attack.threat_model()
        bounds = t.bounds(x)
        e = t.eps
        assert e is not None  # a ball
        self.eps_all: float | Tensor = e if isinstance(e, float) else column(e.to(x), x.ndim)
        self.lower, self.upper = (b if isinstance(b, float) else b[:1] for b in (bounds.lower, bounds.upper))
        self.criterion = attack.criterion
        draw = torch.randint(0, 2**62, (1,), generator=g, device=g.device if g is not None else "cpu")
        self.windows = random.Random(int(draw))  # window corners: host integers, one seed from the generator
        self.checks_every_query = not _accelerated(x.device)

    def signs(self, *shape: int) -> Tensor:
        return torch.randint(0, 2, shape, generator=self.g, device=self.x.device).to(self.x.dtype) * 2 - 1

    def eps(self, live: Tensor | None = None) -> float | Tensor:
        """The radius of every sample, or of the samples ``live`` (a column for a per-sample eps)."""
        e = self.eps_all
        return e if isinstance(e, float) or live is None else e.index_select(0, live)

    def judge(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(margin, loss) per sample: the search succeeded where the margin is <= 0 (with a ``criterion``: -1
        where it is met, else 1); it lowers the loss."""
        logits = self.model(x).float()
        lead = cw_margin(logits, y)  # the largest other logit over y's: > 0 once y is lost
        if self.a.targeted:
            margin, loss = lead, F.cross_entropy(logits, y, reduction="none")
        else:
            margin, loss = -lead, -lead if self.a.score == "margin" else -F.cross_entropy(logits, y, reduction="none")
        if self.criterion is not None:
            margin = torch.where(self.criterion(logits, y), -1.0, 1.0)
        return margin, loss

    def run(self) -> Tensor:
        a, x, y = self.a, self.x, self.y
        n, c, h, w = x.shape
        best = self.start()
        margin, loss = self.judge(best, y)
        live = torch.arange(n, device=x.device)
        for q in range(a.queries):
            if self.checks_every_query or q & (q - 1) == 0 or q % 64 == 0:
                live = live[margin.index_select(0, live) > 0]  # one host sync
                if live.numel() == 0:
                    break
            xs, ys, old = x.index_select(0, live), y.index_select(0, live), best.index_select(0, live)
            side = max(int(round(math.sqrt(a.share(q) * h * w))), 1 if a.norm == "linf" else 3)
            side = min(side + (a.norm == "l2" and side % 2 == 0), h, w)
            eps = self.eps(live)
            new = self.linf_step(xs, old, side, eps) if a.norm == "linf" else self.l2_step(xs, old, side, eps)
            m_new, l_new = self.judge(new, ys)
            m_old, l_old = margin.index_select(0, live), loss.index_select(0, live)
            searching = m_old > 0  # frozen once fooled, until the next compaction
            lower = (l_new < l_old) & searching
            take = (lower | (m_new <= 0)) & searching
            loss.index_copy_(0, live, torch.where(lower, l_new, l_old))
            margin.index_copy_(0, live, torch.where(take, m_new, m_old))
            best.index_copy_(0, live, torch.where(take[:, None, None, None], new, old))
        return best

    def corner(self, h: int, w: int, side: int) -> tuple[int, int]:
        return self.windows.randint(0, h - side), self.windows.randint(0, w - side)

    def start(self) -> Tensor:
        """The reference's first point: vertical stripes at +-eps (Linf); pseudo-Gaussian tiles scaled to eps (L2)."""
        a, x, eps = self.a, self.x, self.eps()
        n, c, h, w = x.shape
        if a.norm == "linf":
            return clamp(x + eps * self.signs(n, c, 1, w), self.lower, self.upper)
        side = max(h // 5, 1)
        delta = torch.zeros_like(x)
        top = (h - 5 * side) // 2
        for i in range(h // side):
            for j in range(w // side):
                r, s = top + i * side, top + j * side
                if r + side <= h and s + side <= w:
                    delta[:, :, r:r + side, s:s + side] += self.bump(side) * self.signs(n, c, 1, 1)
        return clamp(x + eps * _unit(delta), self.lower, self.upper)

    def linf_step(self, xs: Tensor, old: Tensor, side: int, eps: float | Tensor) -> Tensor:
        r, s = self.corner(xs.shape[2], xs.shape[3], side)
        step = torch.zeros_like(xs)
        step[:, :, r:r + side, s:s + side] = 2 * eps * self.signs(xs.shape[0], xs.shape[1], 1, 1)
        return clamp(torch.minimum(torch.maximum(old + step, xs - eps), xs + eps), self.lower, self.upper)

    def l2_step(self, xs: Tensor, old: Tensor, side: int, eps: float | Tensor) -> Tensor:
        k, c, h, w = xs.shape
        delta = old - xs
        (r, s), (r2, s2) = self.corner(h, w, side), self.corner(h, w, side)
        one = (slice(None), slice(None), slice(r, r + side), slice(s, s + side))
        two = (slice(None), slice(None), slice(r2, r2 + side), slice(s2, s2 + side))
        mask = torch.zeros_like(xs)
        mask[one] = 1.0
        mask[two] = 1.0
        total = per_sample_norm(delta)  # (k, 1, 1, 1)
        windows = per_sample_norm(delta * mask)
        inside = delta[one]
        bump = self.bump(side) * self.signs(k, c, 1, 1) + inside / (1e-12 + inside.square().sum((2, 3), True).sqrt())
        room = ((eps ** 2 - total.square()).clamp_min(0) / c + windows.square()).sqrt()
        delta[two] = 0.0
        delta[one] = bump / (1e-12 + bump.square().sum((2, 3), True).sqrt()) * room
        return clamp(xs + eps * _unit(delta), self.lower, self.upper)

    def bump(self, side: int) -> Tensor:
        """The reference's meta pseudo-Gaussian window of side ``side``: two stacked halves of opposite sign, each
        a sum of centred rectangles weighted 1 / k^2, unit L2 norm, transposed with probability 1/2."""
        top = _rectangles(side // 2, side, self.x)
        bottom = _rectangles(side - side // 2, side, self.x)
        eta = torch.cat([top, -bottom])
        eta = eta / eta.square().sum().sqrt().clamp_min(1e-12)
        return eta.t() if self.windows.random() > 0.5 else eta


def _rectangles(rows: int, cols: int, like: Tensor) -> Tensor:
    """Centred nested rectangles, the k-th (from 0) weighted 1 / (k + 1)^2, normalised to unit L2 norm."""
    out = torch.zeros(rows, cols, dtype=like.dtype, device=like.device)
    if rows == 0 or cols == 0:
        return out
    r, c = rows // 2, cols // 2
    for k in range(max(r + 1, c + 1)):
        out[max(r - k, 0):min(r + k + 1, rows), max(c - k, 0):min(c + k + 1, cols)] += 1.0 / (k + 1) ** 2
    return out / out.square().sum().sqrt().clamp_min(1e-12)


def _unit(t: Tensor) -> Tensor:
    return t / (per_sample_norm(t) + 1e-12)
