"""An evaluation that audits itself: ``audit(model, data, threat)`` runs the checks a reviewer asks for before
trusting a robust accuracy, and returns a report whose ``flags`` list is empty when nothing is wrong.

The checks (``CHECKS``; docs/attacks.md has the table with what each usually means):

* ``stochastic``: two forward passes of one batch differ (randomness at inference).
* ``zero-gradients``: the margin's input gradient is exactly 0 for over 5% of the samples.
* ``non-finite-gradients``: any input gradient is NaN or inf.
* ``gradient-free-breaks-more``: Square breaks samples APGD-CE and APGD-T left robust (at least 3, and 2%).
* ``transfer-breaks-more``: examples crafted on ``surrogate`` do (the same bound).
* ``accuracy-rises-with-eps``: accuracy at a larger budget exceeds a smaller one's by 3 standard errors.
* ``not-zero-at-unbounded-eps``: over 2% of the samples survive a budget that spans the whole box.
* ``binarization-test-fails``: the attack misses an adversarial example known to exist (Zimmermann et al.,
  NeurIPS 2022) on over 10% of the samples tested (``binarization=True``).

Examples:
    >>> import torch, advfeat as af
    >>> data = af.data.planted(64, 64, seed=0).test
    >>> model = af.models.PlantedNet().eval()
    >>> report = af.audit(model, data, af.L2Ball(0.5), n=32, steps=5, queries=50)
    >>> [f.check for f in report.flags if f.check == "stochastic"]
    []
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .adapters import check_keys, classifier
from .attacks import APGD, L2PGD, Attack, LinfPGD, Square, cw_margin, dlr
from .evaluate import evaluate
from .guard import device_of, frozen_model
from .tally import checked_batches
from .threat import L2Ball, LinfBall, ThreatModel, clamp

__all__ = ["audit", "AuditReport", "Flag", "CHECKS"]

CHECKS = ("stochastic", "zero-gradients", "non-finite-gradients", "gradient-free-breaks-more", "transfer-breaks-more",
          "accuracy-rises-with-eps", "not-zero-at-unbounded-eps", "binarization-test-fails")
"""Every check ``audit`` can flag (the module's table says what each means)."""


@dataclass(frozen=True)
class Flag:
    """One thing wrong: the ``check`` that found it, its ``evidence`` (numbers) and the ``remedy``."""

    check: str
    evidence: str
    remedy: str


@dataclass
class AuditReport:
    """What ``audit`` found: ``flags`` (empty when nothing is wrong) and the ``measurements`` behind them."""

    threat: str
    n: int
    flags: list[Flag] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.flags

    def __str__(self) -> str:
        m = self.measurements
        lines = [f"audit of {m.get('model', 'the model')} in {self.threat} on {self.n} samples: "
                 + ("no flag" if self.ok else f"{len(self.flags)} flag{'s' * (len(self.flags) > 1)}")]
        lines += [f"- {f.check}: {f.evidence}; remedy: {f.remedy}" for f in self.flags]
        if "curve" in m:
            lines.append("robust accuracy by eps: " + ", ".join(f"{e:g}: {100 * a:.1f}%" for e, a in m["curve"]))
        if "gradient_norm_median" in m:
            lines.append(f"input gradient of the margin: median norm {m['gradient_norm_median']:.3g}, "
                         f"{100 * m['zero_gradients']:.1f}% zero")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"threat": self.threat, "n": self.n, "ok": self.ok,
                           "flags": [vars(f) for f in self.flags], "measurements": self.measurements},
                          indent=2, allow_nan=False)

    def figure(self) -> Any:
        """The robustness curve and the per-sample gradient norms as a matplotlib Figure."""
        from .figures import audit_figure

        return audit_figure(self)


def _samples(data: Any, n: int, keys: tuple[str, str] | None, model: nn.Module, box: tuple[float | Tensor, ...],
             dev: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` samples of ``data`` (a Dataset or an iterable of batches), checked as ``evaluate`` checks."""
    loader = DataLoader(data, batch_size=min(n, 500)) if isinstance(data, Dataset) else data
    xs, ys, have = [], [], 0
    for _, x, y, _ in checked_batches(loader, model, keys, (box[0], box[1]), dev, what="data"):
        xs.append(x)
        ys.append(y)
        have += y.shape[0]
        if have >= n:
            break
    if not xs:
        raise ValueError("data: no samples to audit")
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _unbounded(threat: ThreatModel, x: Tensor) -> float:
    """A budget that spans the whole box: any image of the box is within it."""
    lo, hi = threat.lower, threat.upper
    span = float(torch.as_tensor(hi - lo).max())
    return span if isinstance(threat, LinfBall) else span * math.sqrt(x[0].numel())


def audit(
    model: nn.Module,
    data: Any,
    threat: ThreatModel,
    *,
    n: int = 500,
    steps: int = 50,
    queries: int = 1000,
    surrogate: nn.Module | None = None,
    binarization: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    keys: tuple[str, str] | None = None,
) -> AuditReport:
    """Audit an evaluation of ``model`` on the first ``n`` samples of ``data`` (a Dataset, or an iterable of
    batches) in ``threat`` (an ``L2Ball`` or ``LinfBall`` with a float eps): the checks of the module's table, each
    raising a ``Flag`` with its evidence and remedy. ``steps``: APGD's steps; ``queries``: Square's; ``surrogate``:
    a model whose PGD examples are tried on ``model`` (transfer); ``binarization``: also Zimmermann et al.'s test on
    up to 20 samples (slower). Returns an ``AuditReport`` (``flags`` empty when nothing is wrong; ``str``,
    ``to_json``, ``figure``)."""
    if not isinstance(threat, (L2Ball, LinfBall)) or isinstance(threat.eps, Tensor):
        raise TypeError(f"threat must be an L2Ball or LinfBall with a float eps, got {threat!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a whole number >= 1, got {n!r}")
    if surrogate is not None and not isinstance(surrogate, nn.Module):
        raise TypeError(f"surrogate must be an nn.Module or None, got {type(surrogate).__name__}")
    keys = check_keys(keys)
    wrapped = classifier(model)
    dev = device_of(wrapped, device)
    eps = float(threat.eps)
    report = AuditReport(repr(threat), 0, measurements={"model": type(model).__name__})
    m = report.measurements
    torch.manual_seed(seed)
    with frozen_model(wrapped) as net:
        x, y = _samples(data, n, keys, net, (threat.lower, threat.upper), dev)
        report.n = int(y.shape[0])
        with torch.no_grad():
            first, second = net(x).float(), net(x).float()
        spread = float((first - second).abs().max())
        m["forward_difference"] = spread
        if spread > 1e-5 * max(1.0, float(first.abs().max())):
            report.flags.append(Flag("stochastic", f"two forward passes of one batch differ by up to {spread:.3g} in "
                                     "a logit", "evaluate with AutoAttack(..., version='rand') or EOT (gradients "
                                     "averaged over draws), and FixedRandomness (the randomness frozen)"))
        z = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(cw_margin(net(z).float(), y).sum(), z)
    norms = grad.flatten(1).double().norm(dim=1)
    finite = torch.isfinite(norms)
    zero = float((norms == 0).double().mean())
    m.update(zero_gradients=zero, non_finite_gradients=float((~finite).double().mean()),
             gradient_norm_median=float(norms[finite].median()) if bool(finite.any()) else 0.0,
             gradient_norms=[float(v) for v in norms[finite].tolist()])
    if zero > 0.05:
        report.flags.append(Flag("zero-gradients", f"the margin's input gradient is exactly 0 for {100 * zero:.1f}% "
                                 "of the samples", "a non-differentiable or quantising layer: attack a "
                                 "differentiable stand-in (BPDA) and report Square's accuracy beside the gradient "
                                 "attacks'"))
    if not bool(finite.all()):
        report.flags.append(Flag("non-finite-gradients", f"{int((~finite).sum())} samples have NaN or inf input "
                                 "gradients", "fix the model's numerics: gradient attacks cannot be trusted on it"))
    if not bool(finite.all()):
        m["skipped"] = "the attacks: they stop on non-finite gradients"
        return report
    _attacks(report, model, x, y, threat, steps, queries, surrogate, seed)
    _curve(report, model, x, y, threat, eps, steps)
    if binarization:
        _binarization(report, model, x, y, threat, steps)
    return report


def _broken_more(report: AuditReport, check: str, by: Tensor, white_box: Tensor, clean: Tensor, what: str,
                 remedy: str) -> None:
    """Flag when ``by`` breaks samples (correct clean) that the white-box attacks left standing."""
    extra = int((clean & white_box & ~by).sum())
    report.measurements[check.replace("-", "_")] = extra
    if extra >= max(3, math.ceil(0.02 * report.n)):
        report.flags.append(Flag(check, f"{what} breaks {extra} of {report.n} samples that APGD-CE and APGD-T left "
                                 "robust", remedy))


def _attacks(report: AuditReport, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int,
             queries: int, surrogate: nn.Module | None, seed: int) -> None:
    attacks: dict[str, Attack] = {
        "apgd-ce": APGD(threat=threat, steps=steps, seed=seed),
        "apgd-t": APGD(threat=threat, steps=steps, loss=dlr, n_target_classes=3, seed=seed),
        "square": Square(threat=threat, queries=queries, seed=seed)}
    r = evaluate(model, [(x, y)], attacks, per_sample=True, progress=False)
    assert r.samples is not None
    report.measurements["accuracy"] = {k: r.robust_accuracy(k) for k in attacks} | {"clean": r.clean_accuracy}
    report.measurements["passes_per_image"] = {k: r.passes_per_image(k) for k in attacks}
    clean = r.samples["clean"]
    white = r.samples["apgd-ce"] & r.samples["apgd-t"]
    _broken_more(report, "gradient-free-breaks-more", r.samples["square"], white, clean, "Square (no gradient)",
                 "the gradients are masked: run an adaptive attack, and report EvalResult.best_known over every "
                 "attack tried")
    if surrogate is not None:
        ball = L2PGD if isinstance(threat, L2Ball) else LinfPGD
        source = ball(threat=threat, steps=steps, random_start=True)
        with frozen_model(classifier(surrogate)) as s:
            x_adv = source(s, x, y)
        with torch.no_grad(), frozen_model(classifier(model)) as net:
            kept = net(x_adv).argmax(1).cpu() == y.cpu()
        _broken_more(report, "transfer-breaks-more", kept, white, clean, "examples crafted on the surrogate",
                     "the gradients are masked: attack through the surrogate and report the best known accuracy")


def _curve(report: AuditReport, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, eps: float,
           steps: int) -> None:
    """Accuracy at budgets around ``eps`` and at one spanning the whole box, each evaluated on its own."""
    ball = L2Ball if isinstance(threat, L2Ball) else LinfBall
    big = _unbounded(threat, x)
    budgets = sorted({e for e in (eps / 4, eps / 2, eps, 2 * eps, 4 * eps) if e < big} | {big})
    curve = []
    for e in budgets:
        t = ball(e, lower=threat.lower, upper=threat.upper)
        r = evaluate(model, [(x, y)], {"apgd": APGD(threat=t, steps=steps, seed=0)}, progress=False)
        curve.append((e, r.robust_accuracy("apgd")))
    report.measurements["curve"] = curve
    for (e0, a0), (e1, a1) in zip(curve, curve[1:], strict=False):
        if a1 > a0 + 3 * math.sqrt(max(a0 * (1 - a0), 1 / report.n) / report.n):  # 3 standard errors
            report.flags.append(Flag("accuracy-rises-with-eps", f"robust accuracy {100 * a1:.1f}% at eps {e1:g} above "
                                     f"{100 * a0:.1f}% at eps {e0:g}", "the attack fails more as it may move more: "
                                     "more steps, restarts or another loss"))
            break
    last = curve[-1][1]
    if last > 0.02:
        report.flags.append(Flag("not-zero-at-unbounded-eps", f"{100 * last:.1f}% of the samples survive eps {big:g}, "
                                 "a budget that reaches any image of the box", "the gradients are shattered or "
                                 "masked: BPDA, Square, more restarts"))


def _directions(k: int, x: Tensor, threat: ThreatModel, g: torch.Generator) -> Tensor:
    """``k`` random directions of unit size in the threat model's norm, shaped like ``x``'s samples."""
    d = torch.randn((k, *x.shape[1:]), generator=g).to(x)
    size = d.flatten(1).abs().amax(1) if isinstance(threat, LinfBall) else d.flatten(1).norm(dim=1)
    return d / size.clamp_min(1e-12).reshape(k, *([1] * (x.ndim - 1)))


def _binarization(report: AuditReport, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                  steps: int) -> None:
    """Zimmermann et al.'s binarization test (simplified): for samples the attack leaves robust, a linear readout on
    the model's logits is trained to tell the sample's neighbourhood (label 0) from one point at 0.9 eps (label 1),
    so an adversarial example exists by construction; the test fails where the attack on the readout misses it."""
    r = evaluate(model, [(x, y)], {"apgd": APGD(threat=threat, steps=steps, seed=0)}, per_sample=True,
                 progress=False)
    assert r.samples is not None
    robust = r.samples["apgd"].nonzero().squeeze(1)[:20]
    eps = float(cast(float, threat.eps))
    ball = L2Ball if isinstance(threat, L2Ball) else LinfBall
    tested = failed = 0
    g = torch.Generator().manual_seed(0)
    inner = classifier(model)
    for i in robust.tolist():
        xi = x[i:i + 1]
        boundary = clamp(xi + 0.9 * eps * _directions(1, xi, threat, g), threat.lower, threat.upper)
        radii = 0.3 * eps * torch.rand((64,) + (1,) * (xi.ndim - 1), generator=g).to(xi)
        near = clamp(xi + radii * _directions(64, xi, threat, g), threat.lower, threat.upper)
        points = torch.cat([xi, near, boundary])
        labels = torch.cat([torch.zeros(65, dtype=torch.long), torch.ones(1, dtype=torch.long)]).to(xi.device)
        with torch.no_grad(), frozen_model(inner) as net:
            feats = net(points).float()
        readout = nn.Linear(feats.shape[1], 2).to(xi.device)
        opt = torch.optim.Adam(readout.parameters(), lr=0.05)
        weight = torch.tensor([1.0, 65.0], device=xi.device)
        for _ in range(300):
            opt.zero_grad()
            torch.autograd.backward(F.cross_entropy(readout(feats), labels, weight=weight))
            opt.step()
        with torch.no_grad():
            separated = readout(feats).argmax(1)
        if int(separated[0]) != 0 or int(separated[-1]) != 1:
            continue  # the readout could not separate them: no test on this sample
        binary = nn.Sequential(inner, readout).eval()
        tested += 1
        t = ball(eps, lower=threat.lower, upper=threat.upper)
        found = APGD(threat=t, steps=steps, seed=0)(binary, xi, torch.zeros(1, dtype=torch.long, device=xi.device))
        with torch.no_grad():
            failed += int(binary(found).argmax(1).item() == 0)
    report.measurements["binarization"] = {"tested": tested, "failed": failed}
    if tested and failed / tested > 0.1:
        report.flags.append(Flag("binarization-test-fails", f"the attack missed an adversarial example known to exist "
                                 f"on {failed} of {tested} samples", "the attack is too weak for this model: a "
                                 "stronger or adaptive attack"))
