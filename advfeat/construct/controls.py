"""The critics' controls of the paper's claim, as constructions and probes on the same engine and data path.

The paper's claim was argued in public (the Distill discussion, 2019, and later replications; see docs/paper.md). Each
control asks whether something other than non-robust features could explain D_rand's and D_det's results:

* **Bugs** (Nakkiran): adversarial examples that do *not* transfer, made by
  ``nonrobustify(model, loader, keep_correct=[independent models])``: the targeted loss on ``model`` plus the
  other models' cross-entropy on the true label. If D_det's generalisation came from non-robust *features*
  (shared by models), a D_det of such bugs should teach nothing about the real test set.
* **Robust-feature leakage** (Goh): :func:`leakage_probe` trains a linear classifier on a *robust* model's
  features using D_rand / D_det as training data. If it classifies the real test set, the constructed set
  leaks robust features towards its new labels, and D_rand's result need not be about non-robust features.
* **Shortcuts** (Keller Jordan): :func:`shortcut` replaces each adversarial perturbation by a fixed random
  pattern of its target class, of the attack's norm. If a model learns the real task from that, class-keyed
  patterns alone, with no feature of the data, carry part of the effect.
* **Distillation from wrong labels** (Wallace): :func:`wrong_labels` keeps the training images a weak model
  gets wrong, labelled with its predictions. A model trained on them with no perturbation at all can still
  classify the real test set: "mislabelled" data carries the teacher's knowledge.

``advfeat replicate --controls`` runs all four after the six experiments; docs/concepts.md says what each
outcome would mean.

Examples:
    >>> import torch, advfeat as af
    >>> data = af.data.planted(64, 32, seed=0)
    >>> teacher = af.models.PlantedNet()
    >>> wrong = af.controls.wrong_labels(teacher, data.train, progress=False)
    >>> bool((wrong.labels != wrong.meta["original_label"]).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import Unpack

from .._checks import check_positive_float, check_positive_int
from .._digest import fingerprint
from ..adapters import batch_xy, logits_of
from ..guard import device_of, frozen_model, predict
from ..models import penultimate
from ..progress import progress_bar
from .shards import build
from .spec import Build, BuildOptions, specify
from .store import ConstructedDataset

__all__ = ["leakage_probe", "shortcut", "wrong_labels"]


def _features(model: nn.Module, data: Iterable[Any], which: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """The model's ``"logits"`` or ``"penultimate"`` representation (the input of its last nn.Linear) of every
    image, and the labels."""
    feats, labels = [], []
    with ExitStack() as stack:
        run = stack.enter_context(penultimate(model)) if which == "penultimate" else None
        stack.enter_context(torch.no_grad())
        stack.enter_context(frozen_model(model))
        for batch in data:
            x, y = batch_xy(batch)
            if run is not None:
                feat = run(x.to(device))[0]
            else:
                feat = logits_of(model(x.to(device)))
            feats.append(feat.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    return torch.cat(feats), torch.cat(labels)


def leakage_probe(
    robust_model: nn.Module,
    train_set: Dataset[Any],
    test_set: Dataset[Any],
    *,
    features: str = "logits",
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> float:
    """Goh's robust-feature leakage probe: the real-test accuracy of a linear classifier on ``robust_model``'s
    frozen ``features`` (``"logits"``, Goh's choice, or ``"penultimate"``) trained on ``train_set`` (D_rand or
    D_det with their new labels). Features are standardised on the training set; the classifier is trained with
    Adam and full-precision cross-entropy. Chance on 10 classes is 0.1; Goh found 23.5% (D_rand) and 6.8% (D_det)
    on CIFAR-10.
    """
    if features not in ("logits", "penultimate"):
        raise ValueError(f"features must be 'logits' or 'penultimate', got {features!r}")
    check_positive_int("epochs", epochs)
    check_positive_float("lr", lr)
    dev = device_of(robust_model, device)
    f_train, y_train = _features(robust_model, DataLoader(train_set, batch_size=512), features, dev)
    f_test, y_test = _features(robust_model, DataLoader(test_set, batch_size=512), features, dev)
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(f_train.shape[1], classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=g)
        probe.bias.zero_()
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        order = torch.randperm(len(f_train), generator=g)
        for i in range(0, len(order), batch_size):
            b = order[i:i + batch_size]
            loss = F.cross_entropy(probe(f_train[b]), y_train[b])
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
        sched.step()
    with torch.no_grad():
        return float((probe(f_test).argmax(1) == y_test).double().mean())


def shortcut(
    model: nn.Module,
    loader: DataLoader[Any] | Dataset[Any],
    *,
    mode: str = "det",
    eps: float = 0.5,
    **options: Unpack[BuildOptions],
) -> ConstructedDataset:
    """Keller Jordan's shortcut control: ``nonrobustify``'s relabelling (the same targets for the same ``mode``
    and ``seed``) with each adversarial perturbation replaced by a fixed random pattern of the target class, of L2
    norm ``eps``, added only where ``model`` does not already predict the target (then clamped to the box). The
    patterns (one per class, drawn from ``seed``) carry no feature of the data, only the class key. Per sample:
    ``target_reached`` (the model predicts t after), ``perturbation_norm``, ``original_label``; storage, resume
    and sharding as ``nonrobustify``.
    """
    check_positive_float("eps", eps)
    if options.get("storage", "float32") != "float32":
        raise ValueError("storage: the shortcut control stores float32 (its patterns are below 1/255 per pixel)")
    common = Build(**options)
    seed, lower, upper = common.seed, common.lower, common.upper
    spec = specify("shortcut", model, loader, common, mode=mode, settings={"mode": mode, "eps": eps},
                   fields=("target_reached", "perturbation_norm", "original_label"), desc=f"shortcut {mode}")
    assert spec.targets is not None
    targets, c = spec.targets, spec.classes
    shape = spec.source.get(torch.arange(1))[0].shape[1:]
    patterns = torch.randn((c, *shape), generator=torch.Generator().manual_seed(seed + 1_000_003))
    patterns = patterns / patterns.flatten(1).norm(dim=1).reshape(c, *([1] * len(shape))) * eps

    def work(idx: Tensor, x: Tensor, y: Tensor, _: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        t = targets(idx, y)
        already = predict(spec.model, x) == t
        keyed = x + patterns.to(x.device, x.dtype)[t] * (~already).to(x.dtype).reshape(-1, *([1] * len(shape)))
        keyed = keyed.clamp(lower, upper)
        reached = predict(spec.model, keyed) == t
        norm = (keyed.float() - x.float()).flatten(1).norm(dim=1)
        return keyed, t, {"target_reached": reached, "perturbation_norm": norm, "original_label": y}

    return build(spec, work)


def wrong_labels(
    teacher: nn.Module,
    data: Dataset[Any],
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ConstructedDataset:
    """Wallace's distillation control: the images of ``data`` that ``teacher`` gets wrong, labelled with its
    (wrong) predictions, in memory. ``meta["original_label"]`` keeps the true labels and ``meta["index"]`` the
    positions in ``data``; ``config["teacher_accuracy"]`` the teacher's accuracy on ``data``."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    dev = device_of(teacher, device)
    xs, preds, ys, idx = [], [], [], []
    seen = 0
    loader = DataLoader(data, batch_size=batch_size)
    with progress_bar(loader, desc="wrong labels", enabled=progress) as bar:
        for batch in bar:
            x, y = batch_xy(batch)
            p = predict(teacher, x.to(dev)).cpu()
            wrong = p != y
            xs.append(x[wrong])
            preds.append(p[wrong])
            ys.append(y[wrong])
            idx.append(torch.arange(seen, seen + len(y))[wrong])
            seen += len(y)
    labels, original = torch.cat(preds), torch.cat(ys)
    config = {"kind": "wrong_labels", "n": len(labels), "of": seen, "teacher": fingerprint(teacher),
              "teacher_accuracy": 1 - len(labels) / max(seen, 1)}
    return ConstructedDataset([torch.cat(xs)], [labels], {"original_label": [original], "index": [torch.cat(idx)]},
                              config)
