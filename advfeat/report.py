"""The replication's report: the row names, the paper's and the critics' numbers, ``report.md`` and its figures.

:func:`render_report` turns what ``results.json`` holds into ``report.md`` (so the two always agree);
:func:`draw` writes the figures (``advfeat.figures``, the ``report`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import data as afdata
from . import figures
from .construct import ConstructedDataset

__all__ = ["PAPER", "ROWS", "SHORT", "CONTROLS", "MAP_AXES", "MEASURES", "render_report", "headline_table",
           "map_table", "measures_table", "teaching_table", "spearman", "curve_summary", "gradient_free_table", "draw"]

PAPER = {  # CIFAR-10, ResNet-50: clean / under L2 eps 0.25 (docs/paper.md)
    "standard": (95, 4), "robust": (91, 82), "d_r": (84, 48), "d_nr": (88, 0), "d_rand": (63, 0),
    "d_det": (44, 0), "control": (None, None),
}
ROWS = [
    ("standard", "1. standard training on D", "D"),
    ("robust", "2. adversarial training on D", "D"),
    ("d_r", "3. standard training on D_R", "robustify(robust model)"),
    ("d_nr", "4. standard training on D_NR", "robustify(standard model)"),
    ("d_rand", "5. standard training on D_rand", "nonrobustify(standard, rand)"),
    ("d_det", "6. standard training on D_det", "nonrobustify(standard, det)"),
    ("control", "control: standard training on real images", "first n_construct images of D"),
]
SHORT = {"standard": "D (standard)", "robust": "D (adversarial)", "d_r": "D_R", "d_nr": "D_NR", "d_rand": "D_rand",
         "d_det": "D_det", "control": "real control", "d_det_bugs": "D_det bugs", "leakage_rand": "leak D_rand",
         "leakage_det": "leak D_det", "shortcut_rand": "shortcut rand", "shortcut_det": "shortcut det",
         "distill_wrong": "wrong labels"}
"""Short row names for figures."""


CONTROLS = [  # key, what, the critics' CIFAR-10 numbers (docs/paper.md)
    ("d_det_bugs", "D_det of bugs: targeted on the standard model, keeping an ensemble on the true label "
     "(Nakkiran)", "success 99.3%, transfer 1.7%, trained model 2.8% (plain D_det: transfer 82.5%, 33.2%)"),
    ("leakage_rand", "linear probe on the robust model's logits, trained on D_rand (Goh)", "23.5%"),
    ("leakage_det", "linear probe on the robust model's logits, trained on D_det (Goh)", "6.8%"),
    ("shortcut_rand", "D_rand with class-keyed random patterns instead of the attack (Keller Jordan)", "79.5%"),
    ("shortcut_det", "D_det with class-keyed random patterns instead of the attack (Keller Jordan)", "32.3%"),
    ("distill_wrong", "the images a weak model gets wrong, with its labels (Wallace)", "49.7%"),
]


def draw(out: Path, summary: dict[str, Any], train: Dataset[Any], built: dict[str, ConstructedDataset],
         ranges: Mapping[str, Any] | None = None) -> None:
    """report figures: the results as bars (with ``ranges``, each bar's published range as an error bar: see
    ``figures.results_bars``), and 20 images of D and of each constructed set with class names."""
    s = summary["settings"]
    names = afdata.CLASS_NAMES.get(s["dataset"])
    figures.save(figures.results_bars(summary, ranges=ranges), out / "results.png")
    idx = list(range(20))
    xs, ys = zip(*[train[i] for i in idx], strict=True)
    figures.save(figures.image_grid(torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys]), names,
                                    title=f"D: {s['dataset']} training images"), out / "grids" / "D.png")
    titles = {"d_r": "D_R = robustify(robust model)", "d_nr": "D_NR = robustify(standard model)",
              "d_rand": "D_rand = nonrobustify(standard, rand): true -> new label",
              "d_det": "D_det = nonrobustify(standard, det): true -> new label"}
    for name, title in titles.items():
        if name in built:
            ds = built[name]
            k = idx[: len(ds)]
            xs, ys = zip(*[ds[i] for i in k], strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            if "original_label" in ds.meta:  # relabelled: show the class the image came from and the new one
                fig = figures.image_grid(x, ds.meta["original_label"][k], names, new_labels=y, title=title)
            else:
                fig = figures.image_grid(x, y, names, title=title)
            figures.save(fig, out / "grids" / f"{name.upper()}.png")


HEADLINE = {"standard": "standard training on D", "robust": "adversarial training on D",
            "d_r": "standard training on D_R", "d_nr": "standard training on D_NR",
            "d_rand": "standard training on D_rand", "d_det": "standard training on D_det"}


def headline_table(summary: dict[str, Any], eps: str) -> str:
    """The table README.md and docs/results.md publish for a run: clean and robust accuracy (%) under L2 ``eps``
    for the six experiments and the control, beside the paper's. ``scripts/publish_tables.py`` writes it from a
    ``results.json``; the suite checks the published planted one against its own run."""
    rows = summary["rows"]
    n = summary["settings"]["n_construct"]
    lines = [f"| experiment | clean | L2 eps {eps} | paper (CIFAR-10, eps 0.25) |", "|---|---|---|---|"]
    for key, label in [*HEADLINE.items(), ("control", "control: standard training on " + (
            "all of D (row 1)" if rows["control"].get("same_as") else f"{n:,} real images (D_R's size and recipe)"))]:
        r, p = rows[key], PAPER[key]
        robust = "" if key in ("d_rand", "d_det") else _pct(r["robust"].get(eps))
        paper = "" if p[0] is None else (f"{p[0]}" if key in ("d_rand", "d_det") else f"{p[0]} / {p[1]}")
        lines.append(f"| {label} | {_pct(r['clean'])} | {robust} | {paper} |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def results_table(summary: dict[str, Any]) -> str:
    """The six experiments and the control: clean and robust accuracy (%) at every evaluation eps, the paper's
    numbers and each row's time."""
    s, rows = summary["settings"], summary["rows"]
    eps_keys = [f"{e:g}" for e in s["eval_eps"]]
    head = " | ".join(f"L2 eps {k}" for k in eps_keys)
    lines = [f"| experiment | trained on | clean | {head} | paper clean / adv | time (s) |",
             "|---|---|---|" + "---|" * len(eps_keys) + "---|---|"]
    for key, label, on in ROWS:
        r = rows[key]
        rob = " | ".join(_pct(r["robust"][k]) for k in eps_keys)
        p = PAPER[key]
        paper = "-" if p[0] is None else f"{p[0]} / {p[1]}"
        if r.get("same_as"):  # built from all of D: the control is that row's model, not trained again
            on = f"all of D: row {[k for k, _, _ in ROWS].index(r['same_as']) + 1}, not trained again"
        if key in ("d_rand", "d_det") and "source" in summary:  # attacked the source stage, not row 1's model
            src = f"source ({s['nonrobust_source_epochs']} epochs)"
            on = on.replace("standard", src) + f", eps {s['nonrobust_eps']:g}"
        lines.append(f"| {label} | {on} | {_pct(r['clean'])} | {rob} | {paper} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def constructions_table(summary: dict[str, Any]) -> str:
    """What each constructed set measured (distances, targets reached, y+1 predicted)."""
    rows = summary["rows"]
    lines = ["| dataset | n | measure | value |", "|---|---|---|---|"]
    for key in ("d_r", "d_nr", "d_rand", "d_det"):
        for m, v in rows[key]["construction"].items():
            lines.append(f"| {key} | {rows[key]['n']} | {m} | {v:.3f} |")
    if "predicts_y_plus_1" in rows["d_det"]:
        lines.append(f"| d_det | - | model predicts y+1 on the test set | {rows['d_det']['predicts_y_plus_1']:.3f} |")
    return "\n".join(lines) + "\n"


def controls_table(summary: dict[str, Any]) -> str:
    """The critics' controls (a run with ``--controls``) beside their CIFAR-10 numbers; empty without them."""
    rows = summary["rows"]
    if not any(k in rows for k, _, _ in CONTROLS):
        return ""
    lines = ["| control | what | real test accuracy | targets reached | transfer rate | critics (CIFAR-10) |",
             "|---|---|---|---|---|---|"]
    for key, what, theirs in CONTROLS:
        if key in rows:
            r = rows[key]
            own = rows.get(key.replace("leakage_", "d_")) if key.startswith("leakage_") else None
            if own is not None:  # what the set teaches its own model beyond what robust features alone explain
                what += (f"; the set's own model: {_pct(own['clean'])}, "
                         f"{100 * (own['clean'] - r['clean']):+.1f} beyond the probe")
            lines.append(f"| {key} | {what} | {_pct(r['clean'])} | {_pct(r.get('targets_reached'))} | "
                         f"{_pct(r.get('transfer_rate'))} | {theirs} |")
    return "\n".join(lines) + "\n"


def transfer_table(summary: dict[str, Any]) -> str:
    """The paper's Figure 3 as a table (a run with ``--transfer``); empty without it."""
    if "transfer" not in summary:
        return ""
    lines = ["| # | architecture | test accuracy | transfer rate |", "|---|---|---|---|"]
    for k, t in enumerate(summary["transfer"], 1):
        lines.append(f"| {k} | {t['architecture']} | {_pct(t['test_accuracy'])} | {_pct(t['transfer_rate'])} |")
    return "\n".join(lines) + "\n"


def features_table(summary: dict[str, Any]) -> str:
    """Planted data only: which planted feature each constructed set carries (measured with the planted
    directions), beside each construction's own measure; empty on other data."""
    rows = summary["rows"]
    if "robust_feature_says_y" not in rows["d_r"]["construction"]:
        return ""
    lines = ["| dataset | robust feature says y | non-robust feature says y | non-robust feature says the new label | "
             "construction |", "|---|---|---|---|---|"]
    for key, name in (("d_r", "D_R"), ("d_nr", "D_NR"), ("d_rand", "D_rand"), ("d_det", "D_det")):
        c = rows[key]["construction"]
        if "targets_reached" in c:
            what = f"{_pct(c['targets_reached'])}% of targets reached"
            if key == "d_det" and "predicts_y_plus_1" in rows[key]:
                what += f"; the model predicts y+1 for {_pct(rows[key]['predicts_y_plus_1'])}% of test images"
        else:
            what = f"median relative distance {c['rel_distance_median']:.3f} (p90 {c['rel_distance_p90']:.3f})"
        lines.append(f"| {name} | {_pct(c['robust_feature_says_y'])}% | {_pct(c['nonrobust_feature_says_y'])}% | "
                     f"{_pct(c['nonrobust_feature_says_label'])}% | {what} |")
    return "\n".join(lines) + "\n"


def gradient_free_table(summary: dict[str, Any]) -> str:
    """The gradient-free check: robust accuracy (%) of each row's model on the same test images under L2 PGD,
    under the Square Attack and under AutoAttack's standard cascade at the run's eps, with 95% intervals; empty for
    a run without it (the cascade's columns only where the run measured it)."""
    rows = summary["rows"]
    checked = [(key, label) for key, label, _ in ROWS if "gradient_free" in rows.get(key, {})]
    if not checked:
        return ""
    g0 = rows[checked[0][0]]["gradient_free"]
    cascade = "cascade" in g0
    budget = (f" and AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T at {g0['cascade']['steps']} steps, Square "
              f"at {g0['cascade']['queries']:,} queries, each on the points still robust)" if cascade else "")
    lines = [f"Robust accuracy (%) on the first {g0['n']:,} test images at L2 eps {g0['eps']:g}: PGD (the table's "
             f"attack), the Square Attack ({g0['queries']:,} queries, no gradient){budget}, with 95% intervals. "
             "Square well below PGD would mean the robustness PGD sees is gradient masking.", ""]
    best = "best_known" in g0
    head = ["experiment", "PGD", "Square", "Square - PGD"] + (["AutoAttack", "AutoAttack - PGD"] if cascade else [])
    head += ["best known", "passes per image (PGD / Square / AutoAttack)"] if best else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(g: dict[str, Any]) -> str:
        lo, hi = g["interval_95"]
        return f"{_pct(g['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"

    def gap(g: dict[str, Any], k: str) -> str:
        return f"{100 * (g[k]['accuracy'] - g['pgd']['accuracy']):+.1f}"

    for key, label in checked:
        g = rows[key]["gradient_free"]
        more = [cell(g["autoattack"]), gap(g, "autoattack")] if cascade and "autoattack" in g else []
        if best and "best_known" in g:
            more += [cell(g["best_known"]), " / ".join(f"{g[k]['passes_per_image']:.0f}" for k in
                                                        ("pgd", "square", "autoattack") if k in g)]
        lines.append("| " + " | ".join([label, cell(g["pgd"]), cell(g["square"]), gap(g, "square"), *more]) + " |")
    if best:
        lines += ["", "Best known: per sample, the worst of the three attacks (as RobustBench ranks); passes per "
                  "image: the model's forward and backward passes each attack made, per checked image."]
    return "\n".join(lines) + "\n"


TABLES = {"headline": None, "results": results_table, "constructions": constructions_table,
          "features": features_table, "controls": controls_table, "transfer": transfer_table,
          "gradient_free": gradient_free_table}
"""The tables a run's ``results.json`` renders (``scripts/publish_tables.py`` publishes them by these names;
``headline`` is ``headline_table`` at the run's eps)."""


def render_report(summary: dict[str, Any], spread: str = "") -> str:
    """report.md from the results.json content (so the two always agree); ``spread``: the section that places
    the run in the published spread of its settings (``advfeat.replicate.spread.placement``), when there is one."""
    s = summary["settings"]
    rows = summary["rows"]
    lines = [
        f"# advfeat replication: {s['dataset']} ({s['scale']})", "",
        f"Accuracy (%) on the real test set ({rows['standard']['n_test']} images): clean and under L2 PGD "
        f"({s['eval_steps']} steps, step eps/5, worst iterate). Paper: CIFAR-10, ResNet-50, L2 eps 0.25.", "",
        results_table(summary)]
    if spread:
        lines += ["## Where this run sits among the published runs", "", spread]
    lines += ["## Constructions", "", constructions_table(summary)]
    if "source" in summary:
        src = summary["source"]
        lines += ["", f"D_rand, D_det and the bugs were built through a standard model trained "
                  f"{s['nonrobust_source_epochs']} epochs (not row 1's {s['std_epochs']}): {_pct(src['clean'])}% "
                  "clean on the real test set.", ""]
    curves = [f"{label} {_pct(peak)}% at epoch {epoch}, final {_pct(final)}%" for key, label in
              (("d_rand", "D_rand"), ("d_det", "D_det")) if "curve" in rows.get(key, {})
              for peak, epoch, final in [curve_summary(rows[key]["curve"])]]
    if curves:
        lines += ["", "Learners' real-test accuracy over their epochs (peak, its epoch, final): "
                  + "; ".join(curves) + ". The table reports the final epoch, as the protocol does.", ""]
    gradient_free = gradient_free_table(summary)
    if gradient_free:
        lines += ["## Gradient-free check", "", gradient_free]
    controls, transfer = controls_table(summary), transfer_table(summary)
    if controls:
        lines += ["## The critics' controls", "",
                  "Accuracy (%) of each control on the real test set (a linear probe's for the leakage rows), beside "
                  "the critics' CIFAR-10 numbers (docs/paper.md). Targets reached: on the standard model; "
                  "transfer rate: "
                  "the share a fresh, independently trained standard model classifies as the new label "
                  f"(plain D_det: {_pct(rows['d_det'].get('transfer_rate'))}%).", "", controls]
    if transfer:
        lines += ["## Transfer (the paper's Figure 3)", "",
                  "Architectures trained on D_det: accuracy on the real test set, and the rate at which L2 PGD "
                  f"examples (eps {s['eps']:g}) of the standard model on D transfer to each (among test samples "
                  "the target gets right and the source is fooled by). Figure: grids/transfer.png (each point named by "
                  "its architecture, with a least-squares line).", "", transfer]
    lines += ["## Settings", "",
              f"Learning rate {s['lr']} (SGD, momentum 0.9, wd 5e-4, one-cycle) everywhere except on D_NR and "
              f"D_rand ({s['lr_nr']}), following the authors' recipe (0.1 on D_R / D_det, 0.01 on D_NR / D_rand). "
              "The control uses D_R's recipe on the real images D_R was built from.", "",
              "```", json.dumps(s, indent=1), "```", "",
              f"seed {summary['seed']}, device {summary['device']}; this invocation took "
              f"{summary['total_seconds']:.1f} s (a stage's time is that of the run that did it).", "",
              "Figures: results.png (the table as bars, beside the paper's numbers); grids/D.png, grids/D_R.png, "
              "grids/D_NR.png, grids/D_RAND.png, grids/D_DET.png (20 images each, class names under each; "
              "'true -> new' for the relabelled sets).",
              ""]
    return "\n".join(lines)


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


def curve_summary(curve: list[float]) -> tuple[float, int, float]:
    """A learner's per-epoch real-test curve as (peak, the peak's epoch counted from 1, final)."""
    peak = max(curve)
    return peak, curve.index(peak) + 1, curve[-1]


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
