"""The paper's constructions: ``robustify`` (D_R / D_NR) and ``nonrobustify`` (D_rand / D_det), on the one engine."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import check_positive_float, check_positive_int
from .._digest import fingerprint
from ..adapters import classifier
from ..attacks import L2PGD, cross_entropy
from ..engine import optimize
from ..guard import frozen_model, predict
from ..models import last_linear, penultimate
from ..steps import Constant, Cosine, RelativeToStart, StepRule
from ..threat import Box
from .shards import build
from .spec import Build, specify
from .store import ConstructedDataset

__all__ = ["robustify", "nonrobustify", "ROBUSTIFY_RULE", "NONROBUSTIFY_RULE", "LOW_TARGETS", "LowTargetsWarning"]

ROBUSTIFY_RULE: StepRule = RelativeToStart(Cosine())
"""robustify's default step rule: normalised-gradient steps, cosine-decayed from a fraction (``step_size``, default
0.15) of each sample's pixel distance from its start image. 100 of them get closer than the paper's 1000 fixed steps
of 0.1 and give D_R the same robust features (docs/benchmarks.md, "Step rules")."""

NONROBUSTIFY_RULE: StepRule = Constant()
"""nonrobustify's default step rule: constant normalised-gradient steps (``step_size``, default eps/4; 50 of them).
Chosen by what a D_det teaches (a learner's real-test accuracy per pass), not by targets reached, under a rule
written before the runs (docs/benchmarks.md, "nonrobustify judged by what D_det teaches"; the rule it replaced is in
CHANGELOG.md)."""

LOW_TARGETS = 0.5
"""Below this share of targets reached, ``nonrobustify`` warns (``LowTargetsWarning``)."""

Representation = Callable[[Tensor], Tensor]


class LowTargetsWarning(UserWarning):
    """``nonrobustify`` reached fewer than ``LOW_TARGETS`` of its targets."""


@contextmanager
def _penultimate(model: nn.Module, representation: Representation | None) -> Iterator[Representation]:
    """``g(x)``: the given callable, or the input of the model's last ``nn.Linear`` captured by a hook."""
    if representation is not None:
        yield representation
        return
    with penultimate(model) as run:
        yield lambda x: run(x)[0]


def _check_steps(steps: int, step_size: float, rule: StepRule) -> None:
    if not isinstance(rule, StepRule):
        raise TypeError(f"rule must be an advfeat StepRule (see advfeat.steps), got {rule!r}")
    check_positive_int("steps", steps)
    check_positive_float("step_size", step_size)


def robustify(
    model: nn.Module,
    loader: DataLoader[Any] | Dataset[Any],
    *,
    representation: Representation | None = None,
    init: str = "other",
    steps: int = 100,
    step_size: float = 0.15,
    rule: StepRule = ROBUSTIFY_RULE,
    seed: int = 0,
    lower: float = 0.0,
    upper: float = 1.0,
    out: str | Path | None = None,
    shard_size: int = 4096,
    batch_size: int | None = None,
    storage: str = "float32",
    device: str | torch.device | None = None,
    progress: bool = True,
    keys: tuple[str, str] | None = None,
) -> ConstructedDataset:
    """Rebuild every image from what ``model``'s representation sees of it (the paper's D_R / D_NR).

    Args:
        model: the classifier whose penultimate representation ``g`` is matched (robust: D_R; standard: D_NR).
        loader: a non-shuffling ``DataLoader`` or a map-style ``Dataset`` of ``(x, y, ...)`` tuples or of mappings
            with image and label keys (a Hugging Face ``datasets`` dataset; ``keys=`` names them when they are not
            among ``advfeat.adapters.IMAGE_KEYS`` / ``LABEL_KEYS``), pixels in ``[lower, upper]``. The model may
            return a tensor, a mapping with ``"logits"`` or a Hugging Face output.
        representation: ``g`` as a callable ``x -> (N, ...)``; default: the input of the model's last
            ``nn.Linear`` (a forward hook).
        init: ``"other"``: start from another image of the source, uniform at random (the paper);
            ``"noise"``: from uniform noise in the box.
        steps, step_size, rule: the optimisation over the box: ``steps`` gradient steps proposed by the step
            rule (``advfeat.steps``). Default: 100 steps of ``ROBUSTIFY_RULE``, normalised-gradient steps
            cosine-decayed from 0.15 of each sample's distance from its start, which match closer than the paper's
            recipe in a tenth of its passes. The paper's recipe: ``rule=af.steps.Constant(), step_size=0.1,
            steps=1000``. (Per-coordinate rules such as Adam match even closer but carry non-robust features
            into D_R: see docs/benchmarks.md.)
        seed: the randomness of sample ``i`` depends only on ``(seed, i)``.
        out: a directory to stream shards to (resumable, see the package docs); else built in memory.
        shard_size: samples per shard; batch_size: samples per step (default: the loader's).
        storage: ``"float32"`` (exact) or ``"uint8"`` (quantised: can erase non-robust features).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_steps(steps, step_size, rule)
    if init not in ("other", "noise"):
        raise ValueError(f"init must be 'other' (another image, the paper) or 'noise'; got {init!r}")
    if representation is None:
        last_linear(model)  # raises a clear error before anything is written
    elif not callable(representation):
        raise TypeError(f"representation must be a callable x -> g(x), got {type(representation).__name__}")
    rep_name = "last nn.Linear input" if representation is None else getattr(
        representation, "__qualname__", type(representation).__name__)
    common = Build(seed, lower, upper, out, shard_size, batch_size, storage, device, progress, keys)
    spec = specify("robustify", model, loader, common,
                   settings={"init": init, "steps": steps, "step_size": step_size, "rule": repr(rule),
                             "representation": rep_name},
                   fields=("rel_distance", "start_index"), desc="robustify")
    n = spec.source.n
    if init == "other" and n < 2:
        raise ValueError("init='other' needs at least 2 source images")
    g = torch.Generator().manual_seed(seed)
    other = torch.randint(0, max(1, n - 1), (n,), generator=g)
    other += (other >= torch.arange(n)).long()  # uniform over the other images
    box = Box(lower=lower, upper=upper)

    def work(idx: Tensor, x: Tensor, y: Tensor, images: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if init == "other":  # the images of other[idx], streamed beside the batch by build(companion=other)
            assert images is not None
            start, start_index = images, other[idx]
        else:
            start = torch.stack([
                torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                for i in idx]).to(x.device, x.dtype) * (upper - lower) + lower
            start_index = torch.full_like(idx, -1)
        with frozen_model(spec.model), _penultimate(spec.model, representation) as rep:
            with torch.no_grad():
                target = rep(x).flatten(1).float()
            scale = target.norm(dim=1).clamp_min(1e-12)

            def distance(z: Tensor, index: Tensor | None) -> tuple[Tensor, None]:
                t = target if index is None else target.index_select(0, index)
                s = scale if index is None else scale.index_select(0, index)
                return (rep(z).flatten(1).float() - t).norm(dim=1) / s, None

            z = optimize(distance, x, box, steps=steps, step_size=step_size, maximize=False, start=start,
                         rule=rule).x
            z = z.to(x.dtype)
            with torch.no_grad():
                final = distance(z, None)[0]
        return z, y, {"rel_distance": final.float(), "start_index": start_index}

    return build(spec, work, companion=other if init == "other" else None)


def nonrobustify(
    model: nn.Module,
    loader: DataLoader[Any] | Dataset[Any],
    *,
    mode: str = "det",
    eps: float = 0.5,
    step_size: float | None = None,
    steps: int = 50,
    rule: StepRule = NONROBUSTIFY_RULE,
    keep_best: bool = False,
    keep_correct: Sequence[nn.Module] = (),
    seed: int = 0,
    lower: float = 0.0,
    upper: float = 1.0,
    out: str | Path | None = None,
    shard_size: int = 4096,
    batch_size: int | None = None,
    storage: str = "float32",
    device: str | torch.device | None = None,
    progress: bool = True,
    keys: tuple[str, str] | None = None,
) -> ConstructedDataset:
    """Relabel every image by a targeted L2 attack on a standard ``model`` (the paper's D_rand / D_det).

    Args:
        mode: ``"det"``: target ``(y + 1) mod C``; ``"rand"``: a target uniform over the other classes.
        eps, step_size, steps, rule: the targeted L2 PGD. Default: 50 steps of ``NONROBUSTIFY_RULE``
            (constant normalised-gradient steps of ``step_size``, default ``eps / 4``), chosen by what a model
            trained on the set learns per pass; the paper's recipe: ``rule=af.steps.Constant(), step_size=0.1,
            steps=100`` (CIFAR: eps 0.5); the sweeps' ``default`` rule: ``rule=af.steps.Cosine(), steps=25``
            (``step_size`` eps).
        keep_best: keep each sample's best iterate (target reached first, then the lowest loss; one extra
            forward pass) instead of the last one: Kumano et al.'s recipe is ``rule=af.steps.Constant(),
            step_size=eps / 5, steps=100, keep_best=True``.
        keep_correct: models that must keep classifying each image as its *true* label: the attack minimises
            ``CE(model(x'), t) + mean_i CE(keep_correct[i](x'), y)``, so the perturbation fools ``model`` without
            transferring to them (Nakkiran's "bugs", a control of the paper's claim: see ``advfeat.controls``).
            This harder problem wants the rule that reaches the most targets per pass:
            ``rule=af.steps.Cosine(), step_size=eps, steps=25`` (what ``replicate``'s controls use).
        Others: as ``robustify``.
    """
    check_positive_float("eps", eps)
    keep = list(keep_correct)
    if not all(isinstance(m, nn.Module) for m in keep):
        raise TypeError("keep_correct must be a sequence of nn.Modules (models the perturbation must not fool)")
    step_size = eps / 4 if step_size is None else step_size
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_steps(steps, step_size, rule)
    extra: dict[str, Any] = {}  # recorded only when set, so folders built without them still resume
    if keep:
        extra["keep_correct"] = [fingerprint(m) for m in keep]
    if keep_best:
        extra["keep_best"] = True
    common = Build(seed, lower, upper, out, shard_size, batch_size, storage, device, progress, keys)
    spec = specify("nonrobustify", model, loader, common, mode=mode,
                   settings={"mode": mode, "eps": eps, "step_size": step_size, "steps": steps, "rule": repr(rule)},
                   fields=("target_reached", "perturbation_norm", "original_label"), desc=f"nonrobustify {mode}",
                   extra=extra)
    assert spec.targets is not None
    targets, source_model, others = spec.targets, spec.model, [classifier(m) for m in keep]
    attack = L2PGD(eps, steps=steps, step_size=step_size, targeted=True, lower=lower, upper=upper, rule=rule,
                   keep_best=keep_best)

    def work(idx: Tensor, x: Tensor, y: Tensor, _: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        t = targets(idx, y)
        if others:
            x_adv = _not_transferring(source_model, others, x, y, t, attack)
        else:
            x_adv = attack(source_model, x, t)
        reached = predict(source_model, x_adv) == t
        norm = (x_adv.float() - x.float()).flatten(1).norm(dim=1)
        return x_adv, t, {"target_reached": reached, "perturbation_norm": norm, "original_label": y}

    ds = build(spec, work)
    reached = float(ds.meta["target_reached"].double().mean())
    ds.config["targets_reached"] = reached  # in memory; ConstructedDataset.load recomputes it from the shards
    if reached < LOW_TARGETS:
        warnings.warn(f"nonrobustify reached only {reached:.1%} of its targets (mode={mode!r}, eps={eps:g}, "
                      f"steps={steps}, step_size={step_size:g}, rule={rule!r}): most images keep their own class's "
                      "features under the new label, so the set tests little; raise eps (the budget) or steps",
                      LowTargetsWarning, stacklevel=2)
    return ds


def _not_transferring(model: nn.Module, keep: list[nn.Module], x: Tensor, y: Tensor, t: Tensor,
                      attack: L2PGD) -> Tensor:
    """The targeted attack with ``keep``'s cross-entropy on the true labels added (Nakkiran's bugs): the same
    ball, steps and rule as ``attack``, on the engine."""
    threat = attack.threat_model()

    def objective(z: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        ti = t if index is None else t.index_select(0, index)
        yi = y if index is None else y.index_select(0, index)
        logits = model(z)
        loss = cross_entropy(logits, ti) + torch.stack([cross_entropy(m(z), yi) for m in keep]).mean(0)
        return loss, logits.argmax(1) == ti

    with ExitStack() as stack:
        for m in [model, *keep]:
            stack.enter_context(frozen_model(m))
        return optimize(objective, x, threat, steps=attack.steps, step_size=attack.step_length(threat),
                        maximize=False, rule=attack.rule).x.to(x.dtype)
