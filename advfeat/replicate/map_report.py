"""The generalisation map's tables and figures: ``map.md``'s cells (``map_table``), their measurements
(``measures_table``) and teaching beside transfer (``teaching_table``), and the figures ``advfeat map`` writes
(``write_figures``: ``map.png``, ``curves.png``, ``teaching.png``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import figures
from ..report import _pct, curve_summary

__all__ = ["MAP_AXES", "MEASURES", "spearman", "teaching_table", "measures_table", "map_table", "render",
           "write_figures"]

MAP_AXES = ("mode", "eps", "n", "learner", "source_epochs", "rule", "learner_epochs", "seed")
"""The axes of a generalisation map's cell (``advfeat map``, ``advfeat.generalisation_map``)."""


MEASURES = ("split", "poison", "transfer")
"""The map's measurements beside a cell's teaching (``advfeat map --measure``): ``split``, learners trained on the
reached and the unreached parts of the set apart (equal sizes) and on the unperturbed images with the set's labels;
``poison``, a D_det's images with their true labels against the clean images (Fowl et al. 2021); ``transfer``, how
often independently trained models (two of the source's architecture, one of another) classify the set's moved
images as the set's label, beside the same for the unperturbed images."""


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side.

    >>> spearman([0.1, 0.2, 0.3, 0.4], [10, 30, 20, 40])
    0.8
    """
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must have the same length, got {len(xs)} and {len(ys)}")
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else round(sxy / (sxx * syy) ** 0.5, 4)


def teaching_table(result: dict[str, Any]) -> str:
    """The cells of a map that carry a learning curve or transfer rates, as Markdown: teaching (the learner's
    final, peak and its epoch), transfer to independent models, and the rank correlation of teaching with transfer
    over the cells; empty when no cell has either."""
    cells = [c for c in result["cells"] if "curve" in c or "transfer_same" in c]
    if not cells:
        return ""

    def row(c: dict[str, Any]) -> list[str]:
        peak, epoch, _ = curve_summary(c["curve"]) if "curve" in c else (None, "-", None)
        drop = "-" if peak is None else f"{100 * (peak - c['test_accuracy']):+.1f}"
        return [_pct(c["test_accuracy"]), _pct(peak), str(epoch), drop, _pct(c.get("transfer_same")),
                _pct(c.get("transfer_other")), _pct(c.get("transfer_clean"))]

    lines = _cells_table(result, cells, "Teaching and transfer ({n} test images, {dataset}): the learner's real test "
                         "accuracy % at the end (test), at its best epoch (peak, epoch) and the drop from peak to end; "
                         "the share % of the set's moved images that independently trained models classify as the "
                         "set's label (transfer: the source's architecture, two seeds; other: another architecture) "
                         "and the same for the unperturbed images (clean: the control).",
                         ["test", "peak", "epoch", "peak - test", "transfer", "other", "clean"], row)
    measured = [c for c in cells if "transfer_same" in c]
    if measured:
        lines.append("")
        for axis, along in _axes_of(result, measured):
            rhos = [spearman([c[k] for c in along], [c["test_accuracy"] for c in along])
                    for k in ("transfer_same", "transfer_other")]
            where = f"along {axis} ({', '.join(_show(c[axis]) for c in along)})" if axis else \
                f"over these {len(along)} cells"
            lines.append(f"Rank correlation (Spearman) of test with transfer / other {where}: "
                         + " / ".join("-" if r is None else f"{r:+.2f}" for r in rhos)
                         + (" (-: fewer than 3 cells, or a constant column)" if None in rhos else "") + ".")
    return "\n".join(lines) + "\n"


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _axes_of(result: dict[str, Any], cells: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """The cells along each axis that varies in the map: those where every other varying axis takes its most
    common value (the base point's, in an ``axes`` design), ordered by the axis. With one varying axis, every cell
    along it; with none, ``(None, cells)``."""
    varying = [a for a in MAP_AXES if len({json.dumps(c[a]) for c in result["cells"]}) > 1]
    if not varying:
        return [(None, cells)]
    base = {a: max((json.dumps(c[a]) for c in result["cells"]),
                   key=[json.dumps(c[a]) for c in result["cells"]].count) for a in varying}
    out: list[tuple[str | None, list[dict[str, Any]]]] = []
    for a in varying:
        along = [c for c in cells if all(json.dumps(c[b]) == base[b] for b in varying if b != a)]
        out.append((a, sorted(along, key=lambda c: c[a])))
    return out


def _cells_table(result: dict[str, Any], cells: list[dict[str, Any]], intro: str, columns: list[str],
                 row: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """A Markdown table of a map's ``cells``: the axes that vary across the map, then ``columns`` (``row(c)``), under
    ``intro`` (formatted with ``n`` test images and ``dataset``)."""
    varying = [a for a in MAP_AXES if len({json.dumps(c[a]) for c in result["cells"]}) > 1] or ["mode"]
    lines = [intro.format(n=f"{result['n_test']:,}", dataset=result["dataset"]), "",
             "| " + " | ".join([*varying, *columns]) + " |", "|" + "---|" * (len(varying) + len(columns))]
    for c in cells:
        axes = [_show(c[a]) for a in varying]
        lines.append("| " + " | ".join([*axes, *row(c)]) + " |")
    return lines


def measures_table(result: dict[str, Any]) -> str:
    """The cells of a map that carry measurements (``MEASURES``) as Markdown: real test accuracy % of each learner;
    empty when no cell has any."""
    cells = [c for c in result["cells"] if "split_size" in c or "poison_accuracy" in c]
    if not cells:
        return ""

    def row(c: dict[str, Any]) -> list[str]:
        poison, clean = c.get("poison_accuracy"), c.get("clean_accuracy")
        gap = "-" if poison is None or clean is None else f"{100 * (poison - clean):+.1f}"
        return [_pct(c["test_accuracy"]), str(c.get("split_size", "-")), _pct(c.get("reached_teaches")),
                _pct(c.get("unreached_teaches")), _pct(c.get("random_labels_teach")), _pct(poison), _pct(clean), gap]

    return "\n".join(_cells_table(
        result, cells, "Real test accuracy % ({n} test images, {dataset}) of learners trained on parts of each cell's "
        "set (the cell's recipe): the reached and the unreached targets apart (equal sizes, subsampled: size), the "
        "unperturbed images with the set's labels (random labels for D_rand), D_det's images with their true labels "
        "(poison) and the clean images with theirs (clean).",
        ["test", "size", "reached", "unreached", "random labels", "poison", "clean", "poison - clean"], row)) + "\n"


def map_table(result: dict[str, Any]) -> str:
    """A generalisation map (what its ``map.json`` holds) as Markdown: one row per cell, the axes that vary, and
    what it measured (%)."""
    cells = result["cells"]
    varying = [a for a in MAP_AXES if len({json.dumps(c[a]) for c in cells}) > 1]
    fixed = {a: cells[0][a] for a in MAP_AXES if a not in varying}
    passes = any("passes" in c for c in cells)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [f"Real test accuracy % ({result['n_test']:,} test images, {result['dataset']}) after training on a "
             "relabelled set; targets reached, fit (accuracy on the set's own labels), y+1 predicted on the test "
             "set (D_det) and the leakage probe (a linear classifier on a robust model's logits trained on the same "
             "set), all %" + ("; passes: the attack's forward+backward passes per image" if passes else "")
             + ". Fixed: " + ", ".join(f"{a} {v}" for a, v in fixed.items()) + "."
             + ("" if result.get("complete", True) else " (A sweep in progress: the cells finished so far.)"), "",
             "| " + "".join(f"{a} | " for a in varying) + ("passes | " if passes else "")
             + "test | targets | fit | y+1 | leakage | test - leakage |",
             "|" + "---|" * (len(varying) + 6 + passes)]
    for c in cells:
        lines.append("| " + "".join((f"{c[a]:g}" if isinstance(c[a], float) else f"{c[a]}") + " | " for a in varying)
                     + (f"{c.get('passes', '-')} | " if passes else "")
                     + f"{pct(c['test_accuracy'])} | {pct(c['targets_reached'])} | {pct(c['fit'])} | "
                     f"{pct(c['predicts_shift'])} | {pct(c['leakage'])} | "
                     f"{100 * (c['test_accuracy'] - c['leakage']):+.1f} |")
    return "\n".join(lines) + "\n"


def render(result: dict[str, Any]) -> str:
    """What ``map.md`` holds: the map's table, and its measurements' table when it has any."""
    extra = [t for t in (measures_table(result), teaching_table(result)) if t]
    return "\n".join([map_table(result), *extra])


def write_figures(out: Path, results: list[dict[str, Any]]) -> None:
    """``map.png`` (a heat map of a grid over mode, eps, n and learner; else each varied axis), ``curves.png``
    (every learner's real-test accuracy by epoch) and, with the transfer measurement, ``teaching.png``."""
    varying = [a for a in MAP_AXES if len({json.dumps(c[a]) for c in results}) > 1]
    if set(varying) <= {"mode", "eps", "n", "learner"}:  # a grid over the first map's axes: the heat map
        fig = figures.generalisation_map([{**c, "mode": f"D_{c['mode']}"} for c in results])
    else:
        fig = figures.map_axes(results, varying)
    figures.save(fig, out / "map.png")
    label = {id(c): ", ".join(f"{a} {c[a]}" for a in varying) or "cell" for c in results}
    if any("curve" in c for c in results):
        figures.save(figures.learning_curves({label[id(c)]: c["curve"] for c in results if "curve" in c}),
                     out / "curves.png")
    measured = [c for c in results if "transfer_same" in c]
    if measured:
        figures.save(figures.transfer_scatter(
            [c["transfer_same"] for c in measured], [c["test_accuracy"] for c in measured],
            [label[id(c)] for c in measured], title="Teaching against transfer, cell by cell",
            xlabel="the set's moved images classified as its label by independent models (%)",
            ylabel="real test accuracy of the set's learner (%)"), out / "teaching.png")
