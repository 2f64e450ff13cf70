"""Figures for reports, papers and notebooks, drawn with matplotlib (``pip install "advfeat[report]"``).

Every function returns a ``matplotlib.figure.Figure`` built with matplotlib's object-oriented API (no pyplot
state, no display needed): in a notebook a returned figure is shown inline; ``save`` writes it as a PNG
atomically, with the permissions ``open(path, "w")`` would give. ``advfeat replicate`` draws its report with them.

* ``results_bars`` -- the replication's table as grouped bars (clean and robust accuracy per experiment),
  beside the paper's numbers;
* ``image_grid`` -- sample images with class names (``true -> new`` for relabelled sets such as D_det);
* ``transfer_scatter`` -- the paper's Figure 3: test accuracy against transfer rate, with a fitted line;
* ``quality_per_pass`` -- a quality measure against forward+backward passes, one curve per step rule;
* ``generalisation_map`` -- test accuracy of models trained on D_rand / D_det as heat maps over the attack's
  budget, the source size and the learner, with the share of targets the attack reached in each cell.

Examples:
    >>> import torch, advfeat as af
    >>> fig = af.figures.image_grid(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])
    >>> len(fig.axes)
    4
"""

from __future__ import annotations

import importlib
import io
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["results_bars", "image_grid", "transfer_scatter", "quality_per_pass", "generalisation_map", "map_axes",
           "save",
           "require"]

_EXTRA = 'advfeat\'s figures need matplotlib: pip install "advfeat[report]"'


def require() -> None:
    """Raise ImportError naming the ``report`` extra when matplotlib (the figures) or safetensors (the models
    ``advfeat replicate`` exports) is missing."""
    try:
        import matplotlib  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError:
        raise ImportError(_EXTRA) from None


_inline_done = False


def _show_inline_in_jupyter() -> None:
    """In a Jupyter kernel, have IPython draw a returned Figure as a PNG (what pyplot's inline backend would set up;
    our figures never touch pyplot's global state). Elsewhere: nothing."""
    global _inline_done
    if _inline_done:
        return
    _inline_done = True
    # Looked up dynamically: IPython's typing differs between its releases, and a kernel has imported it already.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return
    shell = ipython.get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        pylabtools = importlib.import_module("IPython.core.pylabtools")
        pylabtools.select_figure_formats(shell, {"png"})


def _figure(width: float, height: float) -> Figure:
    require()
    from matplotlib.figure import Figure

    _show_inline_in_jupyter()
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | Path, *, dpi: int = 130) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return Path(path)


def results_bars(summary: Mapping[str, Any], *, eps: str | None = None,
                 ranges: Mapping[str, Any] | None = None) -> Figure:
    """The replication's results (``results.json``'s content) as grouped bars: clean and robust accuracy (at
    ``eps``, default the training eps) per experiment, and the paper's numbers (CIFAR-10, from the summary's
    ``paper`` entry) as outlined bars. Row names come from the summary's ``labels``. ``ranges``: the published
    range of a bar's quantity (``"ROW/clean"``, ``"ROW/robust/EPS"``: objects with ``lo``, ``median``, ``hi`` in
    [0, 1], as ``advfeat.replicate.spread.ranges`` gives them), drawn on the bar as an error bar from the smallest
    to the largest published value with a tick at the median."""
    rows: Mapping[str, Any] = summary["rows"]
    settings = summary["settings"]
    key = eps if eps is not None else f"{settings['eps']:g}"
    paper: Mapping[str, Sequence[Any]] = summary.get("paper", {})
    labels: Mapping[str, str] = summary.get("labels", {})
    names = [(k, labels.get(k, k)) for k in rows]
    fig = _figure(max(7.0, 1.15 * len(names) + 2), 4.6)
    ax = fig.add_subplot()
    w = 0.2
    ranges = ranges or {}
    labelled = False

    def spread(x: float, name: str) -> None:
        nonlocal labelled
        if name in ranges:
            r = ranges[name]
            ax.errorbar([x], [100 * r.median], yerr=[[100 * (r.median - r.lo)], [100 * (r.hi - r.median)]],
                        fmt="_", color="black", ms=7, capsize=2.5, lw=1,
                        label=None if labelled else f"published range ({r.n} runs) and median")
            labelled = True

    for i, (k, _) in enumerate(names):
        r = rows[k]
        ax.bar(i - 1.5 * w, 100 * r["clean"], w, color="#4477aa", label="clean" if i == 0 else None)
        spread(i - 1.5 * w, f"{k}/clean")
        robust = r.get("robust", {}).get(key)
        if robust is not None:
            ax.bar(i - 0.5 * w, 100 * robust, w, color="#ee6677", label=f"L2 eps {key}" if i == 0 else None)
            spread(i - 0.5 * w, f"{k}/robust/{key}")
        p = paper.get(k, (None, None))
        if p[0] is not None:
            ax.bar(i + 0.5 * w, p[0], w, fill=False, edgecolor="#4477aa", hatch="//",
                   label="paper clean (CIFAR-10)" if i == 0 else None)
        if p[1] is not None:
            ax.bar(i + 1.5 * w, p[1], w, fill=False, edgecolor="#ee6677", hatch="//",
                   label="paper robust (eps 0.25)" if i == 0 else None)
    ax.set_xticks(range(len(names)), [n for _, n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("accuracy on the real test set (%)")
    ax.set_ylim(0, 105)
    ax.axhline(100 / 10, color="grey", lw=0.8, ls=":", label="chance (10 classes)")
    ax.set_title(f"advfeat replicate: {settings['dataset']} ({settings['scale']})", fontsize=10)
    fig.legend(fontsize=7, ncols=6, loc="outside lower center")  # outside the axes: it hides no bar
    ax.grid(axis="y", alpha=0.3)
    return fig


def image_grid(images: Tensor, labels: Tensor, class_names: Sequence[str] | None = None, *,
               new_labels: Tensor | None = None, columns: int = 10, title: str | None = None) -> Figure:
    """Images (N, C, H, W) in [0, 1] with their class names under each; with ``new_labels``, ``true -> new``
    (a relabelled set: ``labels`` the original classes, ``new_labels`` the classes the set gives)."""
    x = images.detach().float().cpu().clamp(0, 1)
    n = x.shape[0]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _figure(1.25 * cols, 1.45 * rows + (0.3 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        img = x[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None, vmin=0,
                  vmax=1, interpolation="nearest")
        text = name(int(labels[i]))
        if new_labels is not None:
            text = f"{text}\n-> {name(int(new_labels[i]))}"
        ax.set_title(text, fontsize=6.5, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def transfer_scatter(rates: Sequence[float], accuracies: Sequence[float], names: Sequence[str] | None = None, *,
                     title: str = "Transfer and learning from D_det (the paper's Figure 3)",
                     xlabel: str = "transfer rate of the source model's adversarial examples (%)",
                     ylabel: str = "test accuracy after training on D_det (%)") -> Figure:
    """Test accuracy of models trained on D_det against the rate at which the source model's adversarial
    examples transfer to them (fractions in [0, 1]), each point named, with a least-squares line. The map's
    teaching-against-transfer figure is the same plot with its own labels."""
    fig = _figure(5.2, 4.0)
    ax = fig.add_subplot()
    xs = [100 * r for r in rates]
    ys = [100 * a for a in accuracies]
    ax.scatter(xs, ys, color="#4477aa", zorder=3)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        ax.annotate(names[i] if names is not None else str(i + 1), (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    if len(xs) >= 2 and max(xs) > min(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        slope, intercept = torch.linalg.lstsq(torch.stack([t, torch.ones_like(t)], 1),
                                              torch.tensor(ys, dtype=torch.float64)[:, None]).solution.flatten()
        grid = torch.linspace(min(xs), max(xs), 50, dtype=torch.float64)
        ax.plot(grid.numpy(), (slope * grid + intercept).numpy(), color="#ee6677", lw=1,
                label=f"fit: {float(slope):.2f} x {'-' if intercept < 0 else '+'} {abs(float(intercept)):.1f}")
        ax.legend(fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def learning_curves(curves: Mapping[str, Sequence[float]], *, chance: float = 0.1,
                    title: str = "Real test accuracy of each learner after every epoch") -> Figure:
    """One line per learner (its name: the label) of its per-epoch accuracy (fractions), its peak marked, and
    chance as a dashed line."""
    fig = _figure(5.6, 4.0)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ys = [100 * v for v in curve]
        epochs = list(range(1, len(ys) + 1))
        (line,) = ax.plot(epochs, ys, marker="o", ms=2, lw=1, label=name)
        best = max(range(len(ys)), key=ys.__getitem__)
        ax.plot([epochs[best]], [ys[best]], marker="*", ms=8, color=line.get_color())
    ax.axhline(100 * chance, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("real test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def quality_per_pass(rows: Sequence[Mapping[str, Any]], *, value: str, label: str, title: str = "",
                     series: str = "rule", passes: str = "passes", log_y: bool = False) -> Figure:
    """One curve per ``series`` (e.g. step rule): ``value`` against ``passes`` (log scale) from benchmark rows."""
    fig = _figure(5.6, 4.0)
    ax = fig.add_subplot()
    for s in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[passes], r[value]) for r in rows if r[series] == s)
        ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", ms=3, label=s)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("forward + backward passes")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def generalisation_map(cells: Sequence[Mapping[str, Any]], *, chance: float = 0.1,
                       title: str = "When do non-robust features generalise?") -> Figure:
    """Heat maps of real-test accuracy after training on a relabelled set, one panel per ``mode``: columns are the
    attack's budget ``eps``, rows the ``learner`` and the source size ``n``. Each cell (a mapping with ``mode``,
    ``eps``, ``n``, ``learner``, ``test_accuracy`` and ``targets_reached``, fractions in [0, 1]) shows the accuracy
    and, below it, the share of targets reached; the colour scale starts at ``chance``."""
    modes = list(dict.fromkeys(str(c["mode"]) for c in cells))
    eps = sorted({float(c["eps"]) for c in cells})
    rows = sorted({(str(c["learner"]), int(c["n"])) for c in cells},
                  key=lambda r: ([str(c["learner"]) for c in cells].index(r[0]), r[1]))
    fig = _figure(1.6 + 1.25 * len(eps) * len(modes), 1.2 + 0.42 * len(rows))
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    image = None
    for ax, mode in zip(axes, modes, strict=True):
        grid = torch.full((len(rows), len(eps)), float("nan"))
        for c in cells:
            if str(c["mode"]) != mode:
                continue
            i, j = rows.index((str(c["learner"]), int(c["n"]))), eps.index(float(c["eps"]))
            grid[i, j] = 100 * float(c["test_accuracy"])
            dark = float(c["test_accuracy"]) < (1 + chance) / 2  # the low end of viridis is dark
            ax.text(j, i, f"{100 * float(c['test_accuracy']):.1f}\n({100 * float(c['targets_reached']):.0f}%)",
                    ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=100 * chance, vmax=100, aspect="auto", alpha=0.8)
        ax.set_xticks(range(len(eps)), [f"{e:g}" for e in eps])
        ax.set_xlabel("attack budget (L2 eps)")
        ax.set_yticks(range(len(rows)), [f"{learner}, {n:,}" for learner, n in rows], fontsize=7)
        ax.set_title(f"trained on {mode}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="real test accuracy (%); below: targets reached", shrink=0.9)
    fig.suptitle(title, fontsize=9)
    return fig


def map_axes(cells: Sequence[Mapping[str, Any]], axes: Sequence[str], *, chance: float = 0.1,
             title: str = "One axis at a time from the base point") -> Figure:
    """The ``axes`` design of the generalisation map: one panel per axis in ``axes``, and in it, for each value of
    that axis (the others at the base point, ``cells[0]``), the real-test accuracy of the model trained on the
    relabelled set beside the leakage probe's (a linear classifier on a robust model's logits trained on the same
    set); a dashed line at ``chance``. Cells are mappings with the axes, ``mode``, ``test_accuracy`` and
    ``leakage`` (fractions)."""
    base = cells[0]
    fig = _figure(1.2 + 2.3 * max(1, len(axes)), 3.0)
    panels = fig.subplots(1, max(1, len(axes)), squeeze=False)[0]
    for ax, axis in zip(panels, axes, strict=False):
        row = [c for c in cells if all(c[k] == base[k] for k in base if k not in (axis, "test_accuracy", "leakage")
                                       and k in ("mode", "eps", "n", "learner", "source_epochs", "rule",
                                                 "learner_epochs", "seed"))]
        row = sorted(row, key=lambda c: (str(type(c[axis])), c[axis]))
        xs = range(len(row))
        ax.bar([x - 0.2 for x in xs], [100 * float(c["test_accuracy"]) for c in row], 0.4, label="real test")
        ax.bar([x + 0.2 for x in xs], [100 * float(c["leakage"]) for c in row], 0.4, label="leakage probe")
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(xs), [f"{c[axis]:g}" if isinstance(c[axis], float) else str(c[axis]) for c in row],
                     fontsize=7)
        ax.set_xlabel(axis.replace("_", " "))
        ax.set_ylim(0, 100)
        for x, c in zip(xs, row, strict=True):
            if c is base:
                ax.annotate("base", (x, 100 * float(c["test_accuracy"]) + 2), ha="center", fontsize=6)
    panels[0].set_ylabel("accuracy (%)")
    panels[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return fig


def robustness_curve(curve: Any, *, title: str = "") -> Figure:
    """Accuracy (%) against the budget of an ``advfeat.RobustnessCurve`` (or several, a sequence), with its 95%
    intervals as a band and the clean accuracy at budget 0."""
    curves = list(curve) if isinstance(curve, Sequence) else [curve]
    fig = _figure(5.2, 3.8)
    ax = fig.add_subplot()
    for c in curves:
        xs = [0.0, *c.eps]
        ys = [100 * c.clean, *(100 * a for a in c.accuracy)]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=c.name or None)
        ax.fill_between(list(c.eps), [100 * lo for lo, _ in c.intervals], [100 * hi for _, hi in c.intervals],
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("budget (eps)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"Robustness curve ({curves[0].total:,} samples, 95% intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    if any(c.name for c in curves):
        ax.legend(fontsize=7)
    return fig


def audit_figure(report: Any) -> Figure:
    """An ``advfeat.audit`` report as two panels: robust accuracy by eps (each budget attacked on its own; the last
    spans the whole box, where it must reach 0) and the distribution of the input gradients' norms."""
    m = report.measurements
    fig = _figure(9.0, 3.4)
    left, right = fig.subplots(1, 2)
    curve = m.get("curve", [])
    if curve:
        eps, acc = zip(*curve, strict=True)
        left.plot(eps, [100 * a for a in acc], "o-", color="#4477aa")
        left.set_xscale("log")
    left.set_xlabel("eps")
    left.set_ylabel("robust accuracy (%)")
    left.set_ylim(-2, 102)
    left.set_title("accuracy must fall to 0 as eps grows", fontsize=9)
    norms = [v for v in m.get("gradient_norms", []) if v > 0]
    if norms:
        right.hist(norms, bins=30, color="#ee6677")
        right.set_xscale("log")
    right.set_xlabel("norm of the margin's input gradient")
    right.set_title(f"{100 * m.get('zero_gradients', 0):.1f}% of gradients are exactly 0", fontsize=9)
    flags = ", ".join(f.check for f in report.flags) or "no flag"
    fig.suptitle(f"audit: {flags}", fontsize=10)
    return fig
