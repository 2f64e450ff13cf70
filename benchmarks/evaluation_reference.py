"""advfeat's evaluation attacks against a reference port on the same models, batch and budget, in one run.

    python benchmarks/evaluation_reference.py [--attack square|fab-t|autoattack|malt|parts] [--n 500] [--offset 0]
        [--queries 5000] [--threads 1] [--fashion-root DIR] [--models NAME ...] [--norms linf l2]
        [--malt-targets K ...]

For each model (a standard and a PGD-trained planted MLP; a standard and a PGD-trained Fashion-MNIST SmallCNN when
the IDX files are there) and each norm, robust accuracy (%) of advfeat's attack and of torchattacks 3.5.1's port
(``pip install --no-deps torchattacks==3.5.1 scipy requests``) on the same ``--n`` test images with the same budget
(test images ``--offset`` to ``--offset + --n``), and each one's time per image: ``Square`` (``--queries``), FAB-T
(100 steps, 9 targets) or AutoAttack's standard cascade at torchattacks' budget (its AutoAttack runs 10 steps of
APGD, APGD-T and FAB-T, and Square at 5,000 queries; the reference runs 100 steps, which the last two columns add
for advfeat). "No weaker" means advfeat's robust accuracy is at most the reference's + 0.5 points. The AutoAttack
rows add the passes per image (the model's forward and backward passes, ``EvalResult.passes_per_image``) of
advfeat's cascade at 100 steps. ``--attack malt`` sets advfeat's ``AutoAttack(version="malt")`` (APGD-CE, APGD-T on
MALT's nearest targets, FAB-T on one target) beside its standard cascade, both at the reference's 100 steps, on the
same images in one run: robust accuracy, passes per image and time per image of each; ``--malt-targets 3 5 9`` runs
the MALT cascade at each of those target counts (default: the version's own, ``MALT_TARGETS``), a column group each,
``--malt-fab N`` runs its FAB-T on N targets (0: none; default ``MALT_FAB_TARGETS``), ``--malt-only`` leaves the
standard cascade out. ``--attack parts`` runs each attack of the two cascades alone on every image (APGD-CE; APGD-T
on 3 or 9 targets by confidence and on 3, 5 or 9 by MALT; FAB-T on 1 or 9 targets; Square): its robust accuracy,
passes per image, and the images it alone breaks (no other attack of the list does); then the attacks of each
cascade together (an image counts as broken if any of them breaks it run alone: the most the cascade can break) and
the images that they miss and another attack breaks. Prints a Markdown table (docs/benchmarks.md records it).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import advfeat as af
from advfeat.attacks.autoattack import MALT_FAB_TARGETS, MALT_TARGETS

MODELS = ["planted standard", "planted pgd", "fashion-mnist standard", "fashion-mnist pgd"]


def _models(fashion_root: Path | None,
            only: list[str] | None = None) -> dict[str, tuple[nn.Module, Tensor, Tensor, float, float]]:
    """name -> (model, x, y, linf eps, l2 eps), for the names in ``only`` (all when None). Each model is seeded
    on its own, so a subset's models are the same as in a full run."""
    out: dict[str, tuple[nn.Module, Tensor, Tensor, float, float]] = {}
    data = af.data.planted(4000, 1000, seed=0)
    for method in ("standard", "pgd"):
        if only is not None and f"planted {method}" not in only:
            continue
        torch.manual_seed(0)
        m = af.models.PlantedNet()
        af.adversarial_train(m, DataLoader(data.train, batch_size=128, shuffle=True), method=method,
                             attack=af.L2PGD(0.5, steps=5), epochs=10, lr=0.1, progress=False)
        x, y = data.test.tensors()
        out[f"planted {method}"] = (m.eval(), x, y, 0.05, 0.5)
    if fashion_root is not None and (fashion_root / "t10k-images-idx3-ubyte.gz").exists():
        train = Subset(af.data.fashion_mnist(fashion_root, train=True), range(20000))
        test = af.data.fashion_mnist(fashion_root, train=False)
        for method in ("standard", "pgd"):
            if only is not None and f"fashion-mnist {method}" not in only:
                continue
            torch.manual_seed(0)
            m = af.models.SmallCNN()
            af.adversarial_train(m, DataLoader(train, batch_size=128, shuffle=True), method=method,
                                 attack=af.L2PGD(1.0, steps=5), epochs=3, lr=0.05, progress=False)
            x, y = test.tensors()
            out[f"fashion-mnist {method}"] = (m.eval(), x, y, 0.1, 1.0)
    return out


def _timed(f: Callable[[], Tensor]) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _pair(attack: str, model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float,
          queries: int) -> tuple[Callable[[], Tensor], Callable[[], Tensor]]:
    """advfeat's attack and the reference port's, on the same budget, as two calls."""
    import torchattacks

    name = "Linf" if norm == "linf" else "L2"
    if attack == "square":
        return (lambda: af.Square(eps, norm=norm, queries=queries, seed=0)(model, x, y),
                lambda: torchattacks.Square(model, norm=name, eps=eps, n_queries=queries, seed=0)(x, y))
    if attack == "fab-t":
        return (lambda: af.FAB(eps, norm=norm, n_target_classes=9, seed=0)(model, x, y),
                lambda: torchattacks.FAB(model, norm=name, eps=eps, steps=100, multi_targeted=True, n_classes=10,
                                         seed=0)(x, y))
    # torchattacks' AutoAttack as shipped: 10 steps of APGD, APGD-T and FAB-T, Square at 5,000 queries
    return (lambda: af.AutoAttack(norm, eps, steps=10, seed=0)(model, x, y),
            lambda: torchattacks.AutoAttack(model, norm=name, eps=eps, n_classes=10, seed=0)(x, y))


def _row(attack: str, name: str, model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, queries: int) -> str:
    def acc(z: Tensor) -> float:
        with torch.no_grad():
            return 100 * float((model(z).argmax(1) == y).double().mean())

    ours, theirs = _pair(attack, model, x, y, norm, eps, queries)
    (a, t_ours), (b, t_ref) = _timed(ours), _timed(theirs)
    row = (f"| {name} | {norm} | {eps:g} | {acc(x):.1f} | {acc(a):.1f} | {acc(b):.1f} | {acc(a) - acc(b):+.1f} | "
           f"{1000 * t_ours / len(x):.2f} | {1000 * t_ref / len(x):.2f} |")
    if attack == "autoattack":  # and the cascade at the reference's settings (100 steps), with its passes
        full, passes, ms = _evaluated(model, x, y, af.AutoAttack(norm, eps, seed=0))
        row += f" {full:.1f} | {ms:.2f} | {passes:.0f} |"
    return row


def _evaluated(model: nn.Module, x: Tensor, y: Tensor, attack: af.Attack) -> tuple[float, float, float]:
    """(robust accuracy %, passes per image, ms per image) of ``attack`` through ``af.evaluate``."""
    t0 = time.perf_counter()
    r = af.evaluate(model, [(x, y)], {"a": attack}, progress=False)
    seconds = time.perf_counter() - t0
    return 100 * r.robust_accuracy("a"), r.passes_per_image("a"), 1000 * seconds / len(x)


@dataclass(frozen=True, eq=False, repr=False)
class _MaltAt(af.AutoAttack):
    """``AutoAttack(version="malt")`` with its APGD-T on ``k`` MALT targets and its FAB-T on ``fab`` targets (none
    when 0) instead of ``MALT_TARGETS`` and ``MALT_FAB_TARGETS``."""

    k: int = field(default=MALT_TARGETS, kw_only=True)
    fab: int = field(default=MALT_FAB_TARGETS, kw_only=True)

    def parts(self, classes: int) -> tuple[tuple[str, af.Attack], ...]:
        (ce, (name, apgd_t), (fab_name, fab_t)) = super().parts(classes)
        assert isinstance(apgd_t, af.APGD) and isinstance(fab_t, af.FAB)
        out = (ce, (name, replace(apgd_t, n_target_classes=max(1, min(self.k, classes - 1)))))
        if self.fab:
            out += ((fab_name, replace(fab_t, n_target_classes=min(self.fab, classes - 1))),)
        return out


def _malt_head(counts: list[int], fab: int) -> str:
    head = "| model | norm | eps | clean | AutoAttack standard | standard passes/image | standard ms/image |"
    for k in counts:
        m = f"MALT {k}" + (f" + FAB-T {fab}" if fab else "")
        head += f" {m} | {m} - standard | {m} passes/image | fewer passes | {m} ms/image |"
    return head


def _malt_row(name: str, model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float, counts: list[int],
              fab: int, standard: bool) -> str:
    """AutoAttack's standard cascade (unless ``standard`` is False: its cells left empty) and the MALT version at
    each target count, all at 100 steps, on the same images."""
    std = _evaluated(model, x, y, af.AutoAttack(norm, eps, seed=0)) if standard else None
    with torch.no_grad():
        clean = 100 * float((model(x).argmax(1) == y).double().mean())
    row = f"| {name} | {norm} | {eps:g} | {clean:.1f} | " + (
        f"{std[0]:.1f} | {std[1]:.0f} | {std[2]:.1f} |" if std else " | | |")
    for k in counts:
        malt = _evaluated(model, x, y, _MaltAt(norm, eps, version="malt", seed=0, k=k, fab=fab))
        row += (f" {malt[0]:.1f} | {malt[0] - std[0]:+.1f} | {malt[1]:.0f} | {std[1] / max(malt[1], 1e-9):.1f}x | "
                if std else f" {malt[0]:.1f} | | {malt[1]:.0f} | | ") + f"{malt[2]:.1f} |"
    return row


def _parts_rows(name: str, model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float) -> list[str]:
    """Each attack of the standard and MALT cascades alone, at 100 steps, on every image: robust accuracy, passes
    per image, and the images (by position) that it breaks and no other attack of the list does."""
    from advfeat.attacks.losses import dlr

    def apgd_t(k: int, targets: str) -> af.Attack:
        return af.APGD(norm=norm, eps=eps, loss=dlr, n_target_classes=k, targets=targets, seed=0)

    attacks: dict[str, af.Attack] = {
        "APGD-CE": af.APGD(norm=norm, eps=eps, seed=0),
        "APGD-T, 3 by confidence": apgd_t(3, "confidence"), "APGD-T, 9 by confidence": apgd_t(9, "confidence"),
        "APGD-T, 3 by MALT": apgd_t(3, "malt"), "APGD-T, 5 by MALT": apgd_t(5, "malt"),
        "APGD-T, 9 by MALT": apgd_t(9, "malt"),
        "FAB-T": af.FAB(eps, norm=norm, n_target_classes=9, seed=0),
        "FAB-T, 1 target": af.FAB(eps, norm=norm, n_target_classes=1, seed=0),
        "Square": af.Square(eps, norm=norm, queries=5000, seed=0)}
    r = af.evaluate(model, [(x, y)], attacks, per_sample=True, progress=False)
    assert r.samples is not None
    robust = torch.stack([r.samples[k] for k in attacks])  # (attacks, images): still right after the attack
    rows = []
    for i, k in enumerate(attacks):
        alone = (~robust[i] & robust[torch.arange(len(attacks)) != i].all(0)).nonzero().flatten().tolist()
        rows.append(f"| {name} | {norm} | {eps:g} | {k} | {100 * r.robust_accuracy(k):.1f} | "
                    f"{r.passes_per_image(k):.0f} | {', '.join(map(str, alone)) or '-'} |")
    names = list(attacks)
    for label, keys in (("standard cascade's attacks, together", ["APGD-CE", "APGD-T, 9 by confidence", "FAB-T",
                                                                  "Square"]),
                        ("MALT cascade's attacks, together", ["APGD-CE", "APGD-T, 5 by MALT", "FAB-T, 1 target"]),
                        ("APGD-CE and 3 by MALT, together", ["APGD-CE", "APGD-T, 3 by MALT"]),
                        ("all of them", names)):
        together = robust[[names.index(k) for k in keys]].all(0)
        missed = (together & ~robust.all(0)).nonzero().flatten().tolist()  # broken by an attack left out
        rows.append(f"| {name} | {norm} | {eps:g} | {label} | {100 * float(together.double().mean()):.1f} | | "
                    f"{'misses ' + ', '.join(map(str, missed)) if missed else '-'} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", nargs="+", choices=["square", "fab-t", "autoattack", "malt", "parts"],
                    default=["square"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--offset", type=int, default=0, help="the first test image (default: 0)")
    ap.add_argument("--malt-targets", type=int, nargs="+", default=[MALT_TARGETS],
                    help="--attack malt: the MALT cascade at each of these target counts")
    ap.add_argument("--malt-fab", type=int, default=MALT_FAB_TARGETS,
                    help="--attack malt: the MALT cascade's FAB-T on this many targets (0: none; default: the "
                         "version's own, MALT_FAB_TARGETS)")
    ap.add_argument("--malt-only", action="store_true", help="--attack malt: leave the standard cascade out")
    ap.add_argument("--queries", type=int, default=5000, help="Square's budget (the cascade's is 5,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fashion-root", type=Path, default=af.data.FASHION_MNIST_ROOT)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None, help="only these models (default: all)")
    ap.add_argument("--norms", nargs="+", choices=["linf", "l2"], default=["linf", "l2"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: (m, x[args.offset:args.offset + args.n], y[args.offset:args.offset + args.n], linf, l2)
              for name, (m, x, y, linf, l2) in _models(args.fashion_root, args.models).items()}
    for attack in args.attack:
        if attack == "malt":
            head = _malt_head(args.malt_targets, args.malt_fab)
            print(f"\n{head}\n|" + "---|" * (head.count("|") - 1), flush=True)
            for name, (model, x, y, linf, l2) in models.items():
                for norm, eps in (("linf", linf), ("l2", l2)):
                    if norm in args.norms:
                        print(_malt_row(name, model, x, y, norm, eps, args.malt_targets, args.malt_fab,
                                         not args.malt_only), flush=True)
            continue
        if attack == "parts":
            head = "| model | norm | eps | attack alone | robust accuracy | passes/image | images only it breaks |"
            print(f"\n{head}\n|" + "---|" * (head.count("|") - 1), flush=True)
            for name, (model, x, y, linf, l2) in models.items():
                for norm, eps in (("linf", linf), ("l2", l2)):
                    if norm in args.norms:
                        print("\n".join(_parts_rows(name, model, x, y, norm, eps)), flush=True)
            continue
        head = (f"| model | norm | eps | clean | advfeat {attack} | torchattacks {attack} | difference | "
                "advfeat ms/image | torchattacks ms/image |")
        if attack == "autoattack":
            head += " advfeat, 100 steps | its ms/image | its passes/image |"
        print(f"\n{head}\n|" + "---|" * (head.count("|") - 1), flush=True)
        for name, (model, x, y, linf, l2) in models.items():
            for norm, eps in (("linf", linf), ("l2", l2)):
                if norm not in args.norms:
                    continue
                print(_row(attack, name, model, x, y, norm, eps, args.queries), flush=True)

if __name__ == "__main__":
    main()
